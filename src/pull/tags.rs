//! Tag lists and referrers: never cached (a list changes with every push), so the policy is
//! the bound on what an upstream may make the proxy read. A tag list is read page by page
//! under `limits.max_tag_pages` and `limits.max_tag_list_size`; referrers pass through.

use http::header::LINK;

use super::{read_at_most, Call, Puller};
use crate::error::{Error, Subject};
use crate::protocol::{tags, Digest, TagList};
use crate::upstream::UpstreamResponse;

/// One page of a tag list as the client gets it, with the `Link` to the next one.
pub(crate) struct TagPage {
    pub list: TagList,
    pub link: Option<String>,
}

impl Puller<'_> {
    /// Lists tags: upstream pages, at most `limits.max_tag_pages` of them and
    /// `limits.max_tag_list_size` bytes in all, the client's `n` and `last` passed along;
    /// stops as soon as it has more than `n` tags. A list cut by a limit is logged and
    /// counted, and its page links on after its last tag (see [`tags::page`]).
    pub(crate) async fn tag_list(
        &self,
        name: &str,
        mut q: tags::Query<'_>,
    ) -> Result<TagPage, Error> {
        let upstream = self.upstream_name();
        let limits = &self.config.limits;
        let mut budget = usize::try_from(limits.max_tag_list_size.0).unwrap_or(usize::MAX);
        let mut all = Vec::new();
        let mut query = {
            let mut first = url::form_urlencoded::Serializer::new(String::new());
            if let Some(n) = q.n {
                first.append_pair("n", &n.to_string());
            }
            if let Some(last) = q.last {
                first.append_pair("last", last);
            }
            Some(first.finish()).filter(|s| !s.is_empty())
        };
        for page in 1.. {
            let call = Call::get(Subject::Tags, "tags/list").query(query.clone());
            let resp = self.send(call).await?;
            let next = resp
                .response
                .headers()
                .get(LINK)
                .and_then(|v| v.to_str().ok())
                .and_then(next_link_query)
                .filter(|next| Some(next) != query.as_ref());
            let Some(bytes) = read_at_most(resp, budget, upstream).await? else {
                if page == 1 {
                    return Err(Error::BadUpstreamResponse {
                        upstream: upstream.to_owned(),
                        message: format!(
                            "tag list page larger than limits.max_tag_list_size ({})",
                            limits.max_tag_list_size
                        ),
                    });
                }
                q.truncated = true;
                break;
            };
            budget -= bytes.len();
            let page_tags: TagList =
                serde_json::from_slice(&bytes).map_err(|e| Error::BadUpstreamResponse {
                    upstream: upstream.to_owned(),
                    message: format!("invalid tag list: {e}"),
                })?;
            drop(bytes);
            all.extend(page_tags.tags);
            let Some(next) = next else { break };
            let wanted = q.n.is_some_and(|n| {
                all.iter()
                    .filter(|t| q.last.is_none_or(|last| t.as_str() > last))
                    .count()
                    > n
            });
            if wanted {
                break;
            }
            if page >= limits.max_tag_pages {
                q.truncated = true;
                break;
            }
            query = Some(next);
        }
        if q.truncated {
            let detail = format!(
                "{upstream}/{}: {} tags read",
                self.target.repository,
                all.len()
            );
            self.metrics
                .limit_hit(crate::metrics::Limit::TagList, &detail);
        }
        let (list, link) = tags::page(name, all, &q);
        Ok(TagPage { list, link })
    }

    /// The upstream's referrers response for `digest`, passed through as it is.
    pub(crate) async fn referrers(
        &self,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<UpstreamResponse, Error> {
        let query = artifact_type.map(|t| {
            url::form_urlencoded::Serializer::new(String::new())
                .append_pair("artifactType", t)
                .finish()
        });
        self.send(Call::get(Subject::Referrers, format!("referrers/{digest}")).query(query))
            .await
    }
}

/// The query of a `Link: <...?last=x&n=y>; rel="next"` header.
fn next_link_query(link: &str) -> Option<String> {
    let start = link.find('<')? + 1;
    let end = link[start..].find('>')? + start;
    if !link[end..].contains("next") {
        return None;
    }
    let target = &link[start..end];
    target.split_once('?').map(|(_, q)| q.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_query() {
        assert_eq!(
            next_link_query("</v2/a/tags/list?last=b&n=2>; rel=\"next\"").as_deref(),
            Some("last=b&n=2")
        );
        assert_eq!(
            next_link_query("</v2/a/tags/list?last=b>; rel=\"prev\""),
            None
        );
        assert_eq!(next_link_query("garbage"), None);
    }
}
