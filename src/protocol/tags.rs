//! The tags list response and its pagination.
//!
//! This module owns how a tag list (as an upstream returns it) becomes one page for the
//! client. docker-registry 2.8 ignores `n` and `last`, so the proxy fetches upstream pages
//! (the client's `n` and `last` passed along, for upstreams that honour them) and paginates
//! here: sorted ASCIIbetically (Go's `sort.Strings`, i.e. byte order), de-duplicated, `last`
//! exclusive, cut to `n`, with a `Link: <…>; rel="next"` header when more tags remain
//! (distribution-spec "Listing Tags").
//!
//! The proxy reads a bounded number of upstream pages and bytes per client request
//! (`limits.max_tag_pages`, `limits.max_tag_list_size`). When it stops before the upstream's
//! last page the list it has is a prefix ([`Query::truncated`]): the page then always carries a
//! `Link` to continue after its last tag, so a client is never told a cut list is complete.

use serde::{Deserialize, Serialize};

/// The body of `GET /v2/<name>/tags/list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagList {
    pub name: String,
    /// distribution answers `null` for a repository without tags; read that as empty.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub tags: Vec<String>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

/// What the client asked for, and whether the upstream list was cut.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Query<'a> {
    pub n: Option<usize>,
    pub last: Option<&'a str>,
    /// The client's `ns=` (kept in the `Link`).
    pub ns: Option<&'a str>,
    /// The tags are a prefix of the upstream's list: more may follow the last one.
    pub truncated: bool,
}

/// One page of `tags` for repository `name` (as the client addressed it), and the `Link` header
/// value to send with it, if any.
///
/// `n == Some(0)` gives an empty list and no `Link` (spec: MUST). A `Link` is only produced when
/// `n` is given and tags remain after the page:
/// `</v2/<name>/tags/list?last=<last tag of page>&n=<n>>; rel="next"`, query values
/// form-urlencoded. `name` must be a validated name (it goes into the path unencoded).
///
/// `q.ns` is kept in the `Link`; a truncated list gets a `Link` after its last tag
/// (`n == Some(0)` still gives none).
pub(crate) fn page(name: &str, mut tags: Vec<String>, q: &Query<'_>) -> (TagList, Option<String>) {
    tags.sort_unstable();
    tags.dedup();
    if let Some(last) = q.last {
        let after = tags.partition_point(|t| t.as_str() <= last);
        tags.drain(..after);
    }
    let more = match q.n {
        Some(0) => {
            tags.clear();
            false
        }
        Some(n) if tags.len() > n => {
            tags.truncate(n);
            true
        }
        _ => q.truncated,
    };
    let link = match tags.last() {
        Some(last_of_page) if more => {
            let mut query = url::form_urlencoded::Serializer::new(String::new());
            query.append_pair("last", last_of_page);
            if let Some(n) = q.n {
                query.append_pair("n", &n.to_string());
            }
            if let Some(ns) = q.ns {
                query.append_pair("ns", ns);
            }
            Some(format!(
                "</v2/{name}/tags/list?{}>; rel=\"next\"",
                query.finish()
            ))
        }
        _ => None,
    };
    (
        TagList {
            name: name.to_owned(),
            tags,
        },
        link,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`page`] with only `n` and `last`.
    fn paginate(
        name: &str,
        tags: Vec<String>,
        n: Option<usize>,
        last: Option<&str>,
    ) -> (TagList, Option<String>) {
        page(
            name,
            tags,
            &Query {
                n,
                last,
                ..Query::default()
            },
        )
    }

    fn v(tags: &[&str]) -> Vec<String> {
        tags.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sorts_asciibetically_and_dedupes() {
        let (page, link) = paginate(
            "a/b",
            v(&["b", "B", "a", "b", "_x", "1.0", "10", "2"]),
            None,
            None,
        );
        assert_eq!(page.name, "a/b");
        assert_eq!(page.tags, v(&["1.0", "10", "2", "B", "_x", "a", "b"]));
        assert_eq!(link, None);
    }

    #[test]
    fn last_is_exclusive_and_need_not_exist() {
        let all = v(&["a", "b", "c", "d"]);
        assert_eq!(
            paginate("r", all.clone(), None, Some("b")).0.tags,
            v(&["c", "d"])
        );
        assert_eq!(
            paginate("r", all.clone(), None, Some("bb")).0.tags,
            v(&["c", "d"])
        );
        assert_eq!(paginate("r", all.clone(), None, Some("0")).0.tags, all);
        assert!(paginate("r", all.clone(), None, Some("z"))
            .0
            .tags
            .is_empty());
        // last without n: no Link
        assert_eq!(paginate("r", all, None, Some("a")).1, None);
    }

    #[test]
    fn n_cuts_and_links() {
        let all = v(&["d", "c", "b", "a", "e"]);
        let (page, link) = paginate("team/app", all.clone(), Some(2), None);
        assert_eq!(page.tags, v(&["a", "b"]));
        assert_eq!(
            link.as_deref(),
            Some("</v2/team/app/tags/list?last=b&n=2>; rel=\"next\"")
        );
        let (page, link) = paginate("team/app", all.clone(), Some(2), Some("b"));
        assert_eq!(page.tags, v(&["c", "d"]));
        assert!(link.unwrap().contains("last=d&n=2"));
        // Exactly the remaining number of tags: no Link.
        let (page, link) = paginate("team/app", all.clone(), Some(1), Some("d"));
        assert_eq!(page.tags, v(&["e"]));
        assert_eq!(link, None);
        let (page, link) = paginate("team/app", all, Some(100), None);
        assert_eq!(page.tags.len(), 5);
        assert_eq!(link, None);
    }

    #[test]
    fn n_zero_is_empty_without_link() {
        let (page, link) = paginate("r", v(&["a", "b"]), Some(0), None);
        assert!(page.tags.is_empty());
        assert_eq!(link, None);
        let (page, link) = paginate("r", Vec::new(), Some(0), Some("a"));
        assert!(page.tags.is_empty());
        assert_eq!(link, None);
    }

    #[test]
    fn link_query_is_encoded_and_host_names_kept() {
        let (_, link) = paginate("localhost:5001/x", v(&["a&b=c", "z z"]), Some(1), None);
        assert_eq!(
            link.as_deref(),
            Some("</v2/localhost:5001/x/tags/list?last=a%26b%3Dc&n=1>; rel=\"next\"")
        );
    }

    #[test]
    fn following_links_visits_every_tag_once() {
        let all: Vec<String> = (0..23).map(|i| format!("t{i:02}")).collect();
        let mut seen = Vec::new();
        let mut last: Option<String> = None;
        for _ in 0..100 {
            let (page, link) = paginate("r", all.clone(), Some(5), last.as_deref());
            seen.extend(page.tags.iter().cloned());
            match link {
                Some(_) => last = page.tags.last().cloned(),
                None => break,
            }
        }
        assert_eq!(seen, all);
    }

    #[test]
    fn a_truncated_list_links_on_and_keeps_ns() {
        let q = Query {
            ns: Some("ghcr.io"),
            truncated: true,
            ..Query::default()
        };
        let (page1, link) = page("team/app", v(&["b", "a"]), &q);
        assert_eq!(page1.tags, v(&["a", "b"]));
        assert_eq!(
            link.as_deref(),
            Some("</v2/team/app/tags/list?last=b&ns=ghcr.io>; rel=\"next\"")
        );
        // Cut by n: n and ns both kept.
        let q = Query {
            n: Some(1),
            ns: Some("ghcr.io"),
            ..Query::default()
        };
        let (_, link) = page("team/app", v(&["a", "b"]), &q);
        assert!(link.unwrap().contains("?last=a&n=1&ns=ghcr.io>"));
        // Not truncated and not cut: no Link; n=0: never a Link.
        assert_eq!(page("r", v(&["a"]), &Query::default()).1, None);
        let q = Query {
            n: Some(0),
            truncated: true,
            ..Query::default()
        };
        assert_eq!(page("r", v(&["a"]), &q).1, None);
    }

    #[test]
    fn json_shape() {
        let (page, _) = paginate("a", v(&["v1"]), None, None);
        assert_eq!(
            serde_json::to_string(&page).unwrap(),
            r#"{"name":"a","tags":["v1"]}"#
        );
        let t: TagList = serde_json::from_str(r#"{"name":"a","tags":null}"#).unwrap();
        assert!(t.tags.is_empty());
        let t: TagList = serde_json::from_str(r#"{"name":"a"}"#).unwrap();
        assert!(t.tags.is_empty());
    }
}
