//! A fake Kubernetes API server for tests, in-process on 127.0.0.1 (axum).
//!
//! It serves exactly what kube-runtime's watcher sends for ModuleTemplates, Manifests,
//! ModuleReleaseMetas
//! (`/apis/operator.kyma-project.io/v1beta2/[namespaces/<ns>/]{moduletemplates,manifests,modulereleasemetas}`)
//! and Secrets (`/api/v1/[namespaces/<ns>/]secrets`):
//! - list with `limit`/`continue` pagination, `labelSelector`, `fieldSelector`
//!   (`metadata.name=`), `resourceVersion`;
//! - `watch=true` with `resourceVersion`, `allowWatchBookmarks`, `timeoutSeconds`,
//!   `sendInitialEvents`, streaming newline-delimited ADDED/MODIFIED/DELETED/BOOKMARK/ERROR
//!   events from the requested resource version (a selector change turns MODIFIED into
//!   ADDED/DELETED, as the real API server does);
//! - a global resource version counter, and `410 Gone` (an ERROR event with an expired
//!   Status, as the API server sends it) for watches older than the compaction point.
//!
//! Test API: [`FakeKubeApi::apply`], [`FakeKubeApi::delete`], [`FakeKubeApi::expire_watches`],
//! [`FakeKubeApi::send_bookmarks`], [`FakeKubeApi::set_served`], [`FakeKubeApi::request_log`],
//! plus [`FakeKubeApi::client`] and [`FakeKubeApi::write_kubeconfig`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// The three resources the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Res {
    ModuleTemplates,
    Manifests,
    ModuleReleaseMetas,
    Secrets,
}

impl Res {
    pub fn from_kind(kind: &str) -> Res {
        match kind {
            "ModuleTemplate" => Res::ModuleTemplates,
            "Manifest" => Res::Manifests,
            "ModuleReleaseMeta" => Res::ModuleReleaseMetas,
            "Secret" => Res::Secrets,
            other => panic!("fake Kubernetes API does not serve kind {other}"),
        }
    }

    fn from_plural(group_version: &str, plural: &str) -> Option<Res> {
        match (group_version, plural) {
            ("operator.kyma-project.io/v1beta2", "moduletemplates") => Some(Res::ModuleTemplates),
            ("operator.kyma-project.io/v1beta2", "manifests") => Some(Res::Manifests),
            ("operator.kyma-project.io/v1beta2", "modulereleasemetas") => {
                Some(Res::ModuleReleaseMetas)
            }
            ("v1", "secrets") => Some(Res::Secrets),
            _ => None,
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Res::ModuleTemplates => "ModuleTemplate",
            Res::Manifests => "Manifest",
            Res::ModuleReleaseMetas => "ModuleReleaseMeta",
            Res::Secrets => "Secret",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Res::Secrets => "v1",
            _ => "operator.kyma-project.io/v1beta2",
        }
    }
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct LoggedRequest {
    pub path: String,
    /// Decoded query parameters (last value wins).
    pub query: BTreeMap<String, String>,
}

impl LoggedRequest {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query.get(key).map(String::as_str)
    }

    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch"), Some("true" | "1"))
    }

    /// The resource the request addressed, if any.
    pub fn resource(&self) -> Option<Res> {
        parse_path(&self.path).map(|(res, _)| res)
    }
}

/// A label selector: comma-separated requirements, all of which must hold.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelSelector(Vec<Requirement>, Option<String>);

#[derive(Clone, Debug, PartialEq)]
enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
}

impl LabelSelector {
    /// Parses `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`, comma = AND.
    pub fn parse(s: &str) -> Result<LabelSelector, String> {
        let mut parts = Vec::new();
        let mut depth = 0usize;
        let mut start = 0;
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.checked_sub(1).ok_or("unbalanced )")?,
                ',' if depth == 0 => {
                    parts.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&s[start..]);
        let mut reqs = Vec::new();
        for part in parts.into_iter().map(str::trim).filter(|p| !p.is_empty()) {
            reqs.push(Requirement::parse(part)?);
        }
        Ok(LabelSelector(reqs, None))
    }

    /// Adds a `fieldSelector`: only `metadata.name=<name>` (as the catalog sends it).
    pub fn with_fields(mut self, s: &str) -> Result<LabelSelector, String> {
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("metadata.name", v)) => self.1 = Some(v.trim_start_matches('=').to_string()),
                _ => return Err(format!("unsupported field selector {part:?}")),
            }
        }
        Ok(self)
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| r.matches(labels))
    }

    pub fn matches_object(&self, obj: &Value) -> bool {
        let name = obj
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str);
        self.1.as_deref().is_none_or(|n| name == Some(n)) && self.matches(&labels_of(obj))
    }
}

impl Requirement {
    fn parse(p: &str) -> Result<Requirement, String> {
        let set = |rest: &str| -> Result<BTreeSet<String>, String> {
            let rest = rest.trim();
            let inner = rest
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("expected (values) in {p:?}"))?;
            Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
        };
        if let Some(k) = p.strip_prefix('!') {
            return Ok(Requirement::NotExists(k.trim().to_string()));
        }
        if let Some((k, v)) = p.split_once("!=") {
            return Ok(Requirement::NotEq(k.trim().into(), v.trim().into()));
        }
        if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
            return Ok(Requirement::Eq(k.trim().into(), v.trim().into()));
        }
        if let Some((k, rest)) = p.split_once(" notin ") {
            return Ok(Requirement::NotIn(k.trim().into(), set(rest)?));
        }
        if let Some((k, rest)) = p.split_once(" in ") {
            return Ok(Requirement::In(k.trim().into(), set(rest)?));
        }
        if p.contains(|c: char| c.is_whitespace() || "()<>".contains(c)) {
            return Err(format!("unsupported requirement {p:?}"));
        }
        Ok(Requirement::Exists(p.to_string()))
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Eq(k, v) => labels.get(k) == Some(v),
            Requirement::NotEq(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
        }
    }
}

fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

type Key = (Res, String, String);

/// One change, kept for watches that resume from an older resource version.
#[derive(Clone)]
struct Change {
    rv: u64,
    res: Res,
    namespace: String,
    /// The object before the change (None = created).
    old: Option<Value>,
    /// The object after the change (None = deleted).
    new: Option<Value>,
    /// The object the event carries (for deletions: the last state with the deletion's rv).
    object: Value,
}

enum Msg {
    Line(String),
    Close,
}

struct Sub {
    res: Res,
    namespace: Option<String>,
    selector: LabelSelector,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Msg>,
}

impl Sub {
    fn event_for(&self, change: &Change) -> Option<Value> {
        if change.res != self.res {
            return None;
        }
        if self
            .namespace
            .as_ref()
            .is_some_and(|ns| *ns != change.namespace)
        {
            return None;
        }
        let old = change.old.as_ref().map(|o| self.selector.matches_object(o));
        let new = change.new.as_ref().map(|o| self.selector.matches_object(o));
        let kind = match (old, new) {
            (None | Some(false), Some(true)) => "ADDED",
            (Some(true), Some(true)) => "MODIFIED",
            (Some(true), Some(false) | None) => "DELETED",
            _ => return None,
        };
        Some(json!({"type": kind, "object": change.object}))
    }
}

struct Inner {
    rv: u64,
    /// Watches from a resource version below this get 410 Gone.
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    subs: Vec<Sub>,
    unserved: BTreeSet<Res>,
    log: Vec<LoggedRequest>,
    /// Counts watch streams ever opened, so tests can wait for new ones.
    watches_opened: tokio::sync::watch::Sender<u64>,
}

impl Inner {
    fn broadcast(&mut self, change: &Change) {
        self.subs.retain(|sub| match sub.event_for(change) {
            Some(ev) => sub.tx.send(Msg::Line(ev.to_string())).is_ok(),
            None => !sub.tx.is_closed(),
        });
    }
}

type Shared = Arc<Mutex<Inner>>;

/// The fake API server; it stops when dropped.
pub struct FakeKubeApi {
    addr: SocketAddr,
    inner: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKubeApi {
    fn drop(&mut self) {
        self.server.abort();
        if let Ok(mut inner) = self.inner.lock() {
            for sub in inner.subs.drain(..) {
                let _ = sub.tx.send(Msg::Close);
            }
        }
    }
}

impl FakeKubeApi {
    /// Starts the server on 127.0.0.1 with a free port.
    pub async fn start() -> FakeKubeApi {
        let inner = Arc::new(Mutex::new(Inner {
            rv: 1,
            compacted: 0,
            objects: BTreeMap::new(),
            history: Vec::new(),
            subs: Vec::new(),
            unserved: BTreeSet::new(),
            log: Vec::new(),
            watches_opened: tokio::sync::watch::Sender::new(0),
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeKubeApi {
            addr,
            inner,
            server,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A real kube client talking to this server.
    pub fn client(&self) -> kube::Client {
        let uri = self.url().parse().expect("server uri");
        kube::Client::try_from(kube::Config::new(uri)).expect("kube client")
    }

    /// Writes a kubeconfig whose current context points at this server.
    pub fn write_kubeconfig(&self, path: &std::path::Path) -> std::io::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(path, text)
    }

    /// Creates or replaces an object (kind, metadata.namespace, metadata.name), emitting
    /// ADDED or MODIFIED. Returns its new resource version.
    pub fn apply(&self, obj: Value) -> u64 {
        self.apply_inner(obj, true)
    }

    /// Like [`apply`](Self::apply) but the change is never sent to watches, as if the
    /// event had been lost; only a re-list reveals it.
    pub fn apply_quietly(&self, obj: Value) -> u64 {
        self.apply_inner(obj, false)
    }

    fn apply_inner(&self, mut obj: Value, notify: bool) -> u64 {
        let res = Res::from_kind(obj["kind"].as_str().expect("object has a kind"));
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .expect("object has metadata.namespace")
            .to_string();
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("object has metadata.name")
            .to_string();
        let mut inner = self.lock();
        inner.rv += 1;
        let rv = inner.rv;
        let key = (res, ns.clone(), name.clone());
        let old = inner.objects.get(&key).cloned();
        obj["apiVersion"] = json!(res.api_version());
        let meta = &mut obj["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        let uid = old
            .as_ref()
            .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("uid-{}-{ns}-{name}-{rv}", res.kind()));
        meta["uid"] = json!(uid);
        if meta.get("creationTimestamp").is_none() {
            meta["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
        }
        inner.objects.insert(key, obj.clone());
        if notify {
            let change = Change {
                rv,
                res,
                namespace: ns,
                old,
                new: Some(obj.clone()),
                object: obj,
            };
            inner.broadcast(&change);
            inner.history.push(change);
        }
        rv
    }

    /// Deletes an object, emitting DELETED. Returns false if it did not exist.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let res = Res::from_kind(kind);
        let mut inner = self.lock();
        let Some(old) = inner
            .objects
            .remove(&(res, namespace.to_string(), name.to_string()))
        else {
            return false;
        };
        inner.rv += 1;
        let rv = inner.rv;
        let mut object = old.clone();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let change = Change {
            rv,
            res,
            namespace: namespace.to_string(),
            old: Some(old),
            new: None,
            object,
        };
        inner.broadcast(&change);
        inner.history.push(change);
        true
    }

    /// Compacts the history at the current resource version: every open watch gets an
    /// ERROR event with a 410 Expired Status and is closed, and any watch from an older
    /// resource version is answered the same way, so clients must re-list.
    pub fn expire_watches(&self) {
        let mut inner = self.lock();
        inner.compacted = inner.rv;
        inner.history.clear();
        let rv = inner.rv;
        for sub in inner.subs.drain(..) {
            let _ = sub.tx.send(Msg::Line(expired_event(0, rv).to_string()));
            let _ = sub.tx.send(Msg::Close);
        }
    }

    /// Sends a BOOKMARK with the current resource version to every open watch that
    /// allowed bookmarks; returns how many got one.
    pub fn send_bookmarks(&self) -> usize {
        let mut inner = self.lock();
        let rv = inner.rv.to_string();
        let mut sent = 0;
        inner.subs.retain(|sub| {
            if !sub.bookmarks {
                return !sub.tx.is_closed();
            }
            let ok = sub
                .tx
                .send(Msg::Line(bookmark_event(sub.res, &rv, false).to_string()))
                .is_ok();
            if ok {
                sent += 1;
            }
            ok
        });
        sent
    }

    /// Whether the resource of `kind` is served; an unserved one answers 404 (a missing CRD).
    pub fn set_served(&self, kind: &str, served: bool) {
        let res = Res::from_kind(kind);
        let mut inner = self.lock();
        if served {
            inner.unserved.remove(&res);
        } else {
            inner.unserved.insert(res);
        }
    }

    /// Number of watch streams currently open.
    pub fn open_watches(&self) -> usize {
        let mut inner = self.lock();
        inner.subs.retain(|s| !s.tx.is_closed());
        inner.subs.len()
    }

    /// Waits until at least `n` watch streams are open.
    pub async fn wait_for_open_watches(&self, n: usize, deadline: Duration) {
        let mut opened = self.lock().watches_opened.subscribe();
        let wait = async {
            loop {
                opened.borrow_and_update();
                if self.open_watches() >= n {
                    return;
                }
                if opened.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(deadline, wait)
            .await
            .unwrap_or_else(|_| panic!("{n} watches not open; open: {}", self.open_watches()));
    }

    /// Every request received so far.
    pub fn request_log(&self) -> Vec<LoggedRequest> {
        self.lock().log.clone()
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

fn expired_event(requested: u64, current: u64) -> Value {
    json!({
        "type": "ERROR",
        "object": status(410, "Expired", &format!("too old resource version: {requested} ({current})")),
    })
}

fn bookmark_event(res: Res, rv: &str, initial_end: bool) -> Value {
    let mut meta = json!({"resourceVersion": rv});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({
        "type": "BOOKMARK",
        "object": {"kind": res.kind(), "apiVersion": res.api_version(), "metadata": meta},
    })
}

fn error_response(code: u16, reason: &str, message: &str) -> Response {
    let status_code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status_code,
        [("content-type", "application/json")],
        status(code, reason, message).to_string(),
    )
        .into_response()
}

/// `(resource, namespace)` for a collection path.
fn parse_path(path: &str) -> Option<(Res, Option<String>)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_string(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    match rest {
        [plural] => Some((Res::from_plural(&gv, plural)?, None)),
        ["namespaces", ns, plural] => Some((Res::from_plural(&gv, plural)?, Some(ns.to_string()))),
        _ => None,
    }
}

async fn handle(State(inner): State<Shared>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let logged = LoggedRequest {
        path: path.clone(),
        query: query.clone(),
    };
    let mut guard = inner.lock().unwrap_or_else(|e| e.into_inner());
    guard.log.push(logged.clone());
    if req.method() != Method::GET {
        return error_response(405, "MethodNotAllowed", "the fake only serves GET");
    }
    let Some((res, namespace)) = parse_path(&path) else {
        return error_response(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    if guard.unserved.contains(&res) {
        return error_response(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    let selector = match LabelSelector::parse(query.get("labelSelector").map_or("", |s| s)) {
        Ok(s) => s,
        Err(e) => return error_response(400, "BadRequest", &format!("invalid labelSelector: {e}")),
    };
    let selector = match selector.with_fields(query.get("fieldSelector").map_or("", |s| s)) {
        Ok(s) => s,
        Err(e) => return error_response(400, "BadRequest", &format!("invalid fieldSelector: {e}")),
    };
    if logged.is_watch() {
        watch(&mut guard, res, namespace, selector, &query)
    } else {
        list(&guard, res, namespace, &selector, &query)
    }
}

fn list(
    inner: &Inner,
    res: Res,
    namespace: Option<String>,
    selector: &LabelSelector,
    query: &BTreeMap<String, String>,
) -> Response {
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    // continue token: "<list rv>|<namespace>|<name>" of the last item returned.
    let (list_rv, after) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let mut parts = token.splitn(3, '|');
            match (
                parts.next().and_then(|r| r.parse::<u64>().ok()),
                parts.next(),
                parts.next(),
            ) {
                (Some(rv), Some(ns), Some(name)) => (rv, Some((ns.to_string(), name.to_string()))),
                _ => return error_response(400, "BadRequest", "invalid continue token"),
            }
        }
        None => (inner.rv, None),
    };
    let mut items: Vec<(&Key, &Value)> = inner
        .objects
        .iter()
        .filter(|((r, ns, _), obj)| {
            *r == res && namespace.as_ref().is_none_or(|n| n == ns) && selector.matches_object(obj)
        })
        .filter(|((_, ns, name), _)| {
            after
                .as_ref()
                .is_none_or(|(ans, aname)| (ns, name) > (ans, aname))
        })
        .collect();
    let more = items.len() > limit;
    items.truncate(limit);
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if more {
        if let Some(((_, ns, name), _)) = items.last() {
            metadata["continue"] = json!(format!("{list_rv}|{ns}|{name}"));
        }
    }
    let body = json!({
        "kind": format!("{}List", res.kind()),
        "apiVersion": res.api_version(),
        "metadata": metadata,
        "items": items.into_iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(),
    });
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn watch(
    inner: &mut Inner,
    res: Res,
    namespace: Option<String>,
    selector: LabelSelector,
    query: &BTreeMap<String, String>,
) -> Response {
    let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let initial_events = query.get("sendInitialEvents").map(String::as_str) == Some("true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let from: Option<u64> = query
        .get("resourceVersion")
        .filter(|rv| !rv.is_empty() && rv.as_str() != "0")
        .and_then(|rv| rv.parse().ok());
    let (tx, rx) = mpsc::unbounded_channel();
    let sub = Sub {
        res,
        namespace,
        selector,
        bookmarks,
        tx,
    };

    match from {
        Some(rv) if rv < inner.compacted && !initial_events => {
            let _ = sub
                .tx
                .send(Msg::Line(expired_event(rv, inner.rv).to_string()));
            let _ = sub.tx.send(Msg::Close);
        }
        Some(rv) if !initial_events => {
            for change in inner.history.iter().filter(|c| c.rv > rv) {
                if let Some(ev) = sub.event_for(change) {
                    let _ = sub.tx.send(Msg::Line(ev.to_string()));
                }
            }
            inner.subs.push(sub);
        }
        _ => {
            // No (or "0") resource version, or a streaming list: synthetic ADDED for
            // the current state, then live events.
            for ((r, ns, _), obj) in &inner.objects {
                let in_ns = sub.namespace.as_ref().is_none_or(|n| n == ns);
                if *r == res && in_ns && sub.selector.matches_object(obj) {
                    let ev = json!({"type": "ADDED", "object": obj});
                    let _ = sub.tx.send(Msg::Line(ev.to_string()));
                }
            }
            if initial_events && bookmarks {
                let ev = bookmark_event(res, &inner.rv.to_string(), true);
                let _ = sub.tx.send(Msg::Line(ev.to_string()));
            }
            inner.subs.push(sub);
        }
    }
    inner.watches_opened.send_modify(|n| *n += 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let body = futures_util::stream::unfold(rx, move |mut rx| async move {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Msg::Line(mut line))) => {
                line.push('\n');
                Some((Ok::<Bytes, std::io::Error>(Bytes::from(line)), rx))
            }
            Ok(Some(Msg::Close) | None) | Err(_) => None,
        }
    });
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        Body::from_stream(body),
    )
        .into_response()
}

#[cfg(test)]
mod fixture_tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selector_semantics() {
        let l = labels(&[("a", "1"), ("b", "2")]);
        let m = |s: &str| LabelSelector::parse(s).expect(s).matches(&l);
        assert!(m(""));
        assert!(m("a=1"));
        assert!(m("a==1,b=2"));
        assert!(!m("a=1,b=3"));
        assert!(m("a!=2"));
        assert!(m("c!=2"));
        assert!(!m("a!=1"));
        assert!(m("a"));
        assert!(!m("c"));
        assert!(m("!c"));
        assert!(!m("!a"));
        assert!(m("a in (1, 3)"));
        assert!(!m("a in (3,4)"));
        assert!(m("a notin (3,4),b"));
        assert!(m("c notin (3)"));
        assert!(!m("b notin (2)"));
        assert!(LabelSelector::parse("a in 1").is_err());
    }

    #[test]
    fn paths_are_parsed() {
        assert_eq!(parse_path("/api/v1/secrets"), Some((Res::Secrets, None)));
        assert_eq!(
            parse_path("/apis/operator.kyma-project.io/v1beta2/namespaces/kcp-system/manifests"),
            Some((Res::Manifests, Some("kcp-system".into())))
        );
        assert_eq!(parse_path("/api/v1/pods"), None);
        assert_eq!(parse_path("/apis/other.io/v1beta2/manifests"), None);
    }
}
