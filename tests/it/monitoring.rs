//! The alerting rules and the Grafana dashboard in `deploy/components/monitoring`: every alert
//! is documented and has a severity, every expression (of an alert or a dashboard panel) names
//! only series (and label values) the proxy exports, `promtool check rules` accepts the groups,
//! `promtool test rules` sees some alerts fire when they should and not before, and the
//! component renders the dashboard as a ConfigMap Grafana's sidecar picks up.
//!
//! `scripts/test` installs promtool (Debian's `prometheus` package). Without it the promtool
//! test prints why and passes, unless `CI` is set: then it fails.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::tool_present;

use serde::Deserialize;
use serde_yaml::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rule() -> Value {
    let path = root().join("deploy/components/monitoring/prometheusrule.yaml");
    let text = std::fs::read_to_string(&path).expect("read prometheusrule.yaml");
    serde_yaml::from_str(&text).expect("parse prometheusrule.yaml")
}

/// Every rule of every group.
fn rules(doc: &Value) -> Vec<Value> {
    let groups = doc["spec"]["groups"].as_sequence().expect("spec.groups");
    assert!(!groups.is_empty());
    groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("group rules").clone())
        .collect()
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} missing in {v:?}"))
}

/// The string literals of every Rust file under `dir`.
fn literals(dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).expect("read src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            literals(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("read source");
            // Every other `"` opens a literal; good enough for the plain literals metric
            // names and label values are written as.
            for (i, piece) in text.split('"').enumerate() {
                if i % 2 == 1 {
                    out.insert(piece.to_owned());
                }
            }
        }
    }
}

/// Names starting with `oci_proxy_` in an expression.
fn series_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("oci_proxy_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// `label="value"` and `label=~"regex"` matchers in an expression: the values.
fn matcher_values(expr: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for (i, piece) in expr.split('"').enumerate() {
        if i % 2 == 1 {
            let before = expr.split('"').nth(i - 1).unwrap_or("");
            out.push((piece.to_owned(), before.ends_with("=~")));
        }
    }
    out
}

#[test]
fn every_alert_has_a_severity_a_summary_and_a_description() {
    let doc = rule();
    assert_eq!(str_of(&doc, "apiVersion"), "monitoring.coreos.com/v1");
    assert_eq!(str_of(&doc, "kind"), "PrometheusRule");
    let mut names = BTreeSet::new();
    for r in rules(&doc) {
        let alert = str_of(&r, "alert");
        assert!(alert.starts_with("OciProxy"), "{alert}");
        assert!(names.insert(alert.to_owned()), "{alert} twice");
        let severity = r["labels"]["severity"].as_str().unwrap_or("");
        assert!(
            ["warning", "critical"].contains(&severity),
            "{alert}: severity {severity:?}"
        );
        for key in ["summary", "description"] {
            let text = r["annotations"][key].as_str().unwrap_or("");
            assert!(text.len() > 20, "{alert}: {key} {text:?}");
        }
    }
    let kustomization =
        std::fs::read_to_string(root().join("deploy/components/monitoring/kustomization.yaml"))
            .expect("read kustomization");
    assert!(kustomization.contains("- prometheusrule.yaml"));
}

#[test]
fn expressions_use_only_series_and_label_values_the_proxy_exports() {
    for r in rules(&rule()) {
        assert_exported(str_of(&r, "alert"), str_of(&r, "expr"));
    }
}

/// Fails unless `expr` names at least one oci-proxy series and only series and label values
/// that appear in the proxy's code.
fn assert_exported(what: &str, expr: &str) {
    static KNOWN: std::sync::OnceLock<BTreeSet<String>> = std::sync::OnceLock::new();
    let known = KNOWN.get_or_init(|| {
        let mut known = BTreeSet::new();
        literals(&root().join("src"), &mut known);
        known
    });
    {
        let alert = what;
        let names = series_names(expr);
        assert!(!names.is_empty(), "{alert} uses no oci-proxy series");
        for name in names {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| known.contains(*b))
                .unwrap_or(&name);
            assert!(
                known.contains(base),
                "{alert}: {name} is not a series the proxy registers"
            );
        }
        for (value, is_regex) in matcher_values(expr) {
            if is_regex {
                continue; // e.g. status=~"5..": a pattern, not a literal value
            }
            assert!(
                known.contains(&value),
                "{alert}: label value {value:?} never appears in the proxy's code"
            );
        }
    }
}

/// The parts of a Grafana dashboard this test looks at.
#[derive(serde::Deserialize)]
struct Dashboard {
    uid: String,
    title: String,
    panels: Vec<Panel>,
    templating: Templating,
}

#[derive(serde::Deserialize)]
struct Templating {
    list: Vec<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct Panel {
    id: u32,
    title: String,
    description: String,
    datasource: PanelDatasource,
    targets: Vec<PanelTarget>,
}

#[derive(serde::Deserialize)]
struct PanelDatasource {
    uid: String,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct PanelTarget {
    ref_id: String,
    expr: String,
}

const DASHBOARD: &str = "deploy/components/monitoring/grafana-dashboard.json";

fn dashboard() -> Dashboard {
    let text = std::fs::read_to_string(root().join(DASHBOARD)).expect("read dashboard");
    serde_json::from_str(&text).expect("parse the dashboard")
}

#[test]
fn dashboard_panels_query_only_what_the_proxy_exports() {
    let d = dashboard();
    assert_eq!(
        (d.uid.as_str(), d.title.as_str()),
        ("oci-proxy", "oci-proxy")
    );
    assert!(
        d.templating.list.iter().any(|v| v["name"] == "datasource"),
        "the data source is a variable, not a fixed uid"
    );
    let mut ids = BTreeSet::new();
    for p in &d.panels {
        assert!(ids.insert(p.id), "panel id {} twice", p.id);
        assert_eq!(p.datasource.uid, "${datasource}", "{}", p.title);
        assert!(p.description.len() > 20, "{}: describe the panel", p.title);
        assert!(!p.targets.is_empty(), "{}: no query", p.title);
        let mut refs = BTreeSet::new();
        for t in &p.targets {
            assert!(refs.insert(t.ref_id.as_str()), "{}: refId twice", p.title);
            assert_exported(&p.title, &t.expr);
        }
    }
    let titles: Vec<&str> = d.panels.iter().map(|p| p.title.as_str()).collect();
    for wanted in [
        "Cache hit ratio",
        "Upstream errors by upstream",
        "Fills",
        "Bytes served by outcome",
        "Token fetches",
        "Catalog state",
    ] {
        assert!(
            titles.contains(&wanted),
            "no panel {wanted:?} in {titles:?}"
        );
    }
}

#[test]
fn the_component_renders_the_dashboard_for_grafanas_sidecar() {
    let kubectl = Command::new("kubectl")
        .args(["kustomize", "--help"])
        .output();
    if !tool_present(
        kubectl.is_ok_and(|o| o.status.success()),
        "kubectl is not installed (scripts/install-deploy-tools installs it)",
    ) {
        return;
    }
    // A component renders only from a kustomization that uses it, by a relative path.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let component = relative(dir.path(), &root().join("deploy/components/monitoring"));
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\ncomponents:\n  - {}\n",
            component.display()
        ),
    )
    .expect("write kustomization");
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(dir.path())
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8_lossy(&out.stdout).into_owned();
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|d| Value::deserialize(d).expect("rendered YAML"))
        .collect();
    let map = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("a ConfigMap");
    assert_eq!(
        map["metadata"]["name"].as_str(),
        Some("oci-proxy-grafana-dashboard")
    );
    assert_eq!(
        map["metadata"]["labels"]["grafana_dashboard"].as_str(),
        Some("1")
    );
    let json = map["data"]["grafana-dashboard.json"]
        .as_str()
        .expect("the dashboard in the ConfigMap");
    let file = std::fs::read_to_string(root().join(DASHBOARD)).expect("read dashboard");
    assert_eq!(json, file);
    assert!(docs.iter().any(|d| d["kind"] == "PrometheusRule"));
}

/// Whether promtool runs ([`tool_present`]).
fn have_promtool() -> bool {
    let found = Command::new("promtool").arg("--version").output();
    tool_present(
        found.is_ok_and(|o| o.status.success()),
        "promtool is not installed (Debian package prometheus; scripts/test installs it)",
    )
}

#[test]
fn promtool_accepts_the_rules() {
    if !have_promtool() {
        return;
    }
    let groups = serde_yaml::to_string(&serde_yaml::Mapping::from_iter([(
        Value::from("groups"),
        rule()["spec"]["groups"].clone(),
    )]))
    .expect("render groups");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("oci-proxy-rules.yaml");
    std::fs::write(&file, groups).expect("write rule file");
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&file)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool check rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    let n = rules(&rule()).len();
    assert!(said.contains(&format!("{n} rules found")), "{said}");
}

#[test]
fn the_helpers_find_what_they_should() {
    assert_eq!(
        series_names("sum(rate(oci_proxy_a_total{x=\"y\"}[5m])) / oci_proxy_b"),
        ["oci_proxy_a_total", "oci_proxy_b"]
    );
    assert_eq!(
        matcher_values("m{a=\"one\", b=~\"t.o\"}"),
        [("one".to_owned(), false), ("t.o".to_owned(), true)]
    );
}

/// One `promtool test rules` case: `series` (with values) make `alert` fire at `fires_at`
/// with `labels`, and not yet at `quiet_at`.
struct Case {
    alert: &'static str,
    series: &'static [(&'static str, &'static str)],
    quiet_at: &'static str,
    fires_at: &'static str,
    labels: &'static [(&'static str, &'static str)],
}

const CASES: &[Case] = &[
    Case {
        alert: "OciProxyUpstreamCredentialsRefused",
        series: &[(
            "oci_proxy_upstream_auth_failures_total{upstream=\"registry.example\"}",
            "0+6x40",
        )],
        quiet_at: "10m",
        fires_at: "25m",
        labels: &[("severity", "warning"), ("upstream", "registry.example")],
    },
    Case {
        alert: "OciProxyCatalogNotReady",
        series: &[("oci_proxy_catalog_ready", "0x30")],
        quiet_at: "5m",
        fires_at: "15m",
        labels: &[("severity", "critical")],
    },
    Case {
        alert: "OciProxyUpstreamSlotsExhausted",
        series: &[(
            "oci_proxy_limit_hits_total{limit=\"upstream_slot_wait\"}",
            "0+3x40",
        )],
        quiet_at: "5m",
        fires_at: "20m",
        labels: &[("severity", "warning")],
    },
    Case {
        alert: "OciProxyCorruptCacheFiles",
        series: &[("oci_proxy_cache_corrupt_blobs_total", "0x5 1x20")],
        quiet_at: "4m",
        fires_at: "10m",
        labels: &[("severity", "warning")],
    },
];

/// The annotations `alert` fires with for `labels` (`{{ $labels.x }}` filled in; the cases
/// avoid alerts whose text depends on `$value`).
fn expected_annotations(alert: &str, labels: &[(&str, &str)]) -> serde_yaml::Mapping {
    let r = rules(&rule())
        .into_iter()
        .find(|r| r["alert"].as_str() == Some(alert))
        .unwrap_or_else(|| panic!("no alert {alert}"));
    let mut out = serde_yaml::Mapping::new();
    for (k, v) in r["annotations"].as_mapping().expect("annotations") {
        let mut text = v.as_str().expect("annotation text").to_owned();
        assert!(!text.contains("$value"), "{alert}: pick another alert");
        for (name, value) in labels {
            text = text.replace(&format!("{{{{ $labels.{name} }}}}"), value);
        }
        assert!(!text.contains("{{"), "{alert}: unfilled template in {text}");
        out.insert(k.clone(), Value::from(text));
    }
    out
}

#[test]
fn promtool_sees_the_alerts_fire_on_time() {
    if !have_promtool() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let groups =
        serde_yaml::Mapping::from_iter([(Value::from("groups"), rule()["spec"]["groups"].clone())]);
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml::to_string(&groups).expect("render rules"),
    )
    .expect("write rules");
    let mut tests = Vec::new();
    for c in CASES {
        let series: Vec<Value> = c
            .series
            .iter()
            .map(|(s, v)| {
                Value::Mapping(serde_yaml::Mapping::from_iter([
                    (Value::from("series"), Value::from(*s)),
                    (Value::from("values"), Value::from(*v)),
                ]))
            })
            .collect();
        let labels = serde_yaml::Mapping::from_iter(
            c.labels
                .iter()
                .map(|(k, v)| (Value::from(*k), Value::from(*v))),
        );
        let firing = Value::Mapping(serde_yaml::Mapping::from_iter([
            (Value::from("exp_labels"), Value::Mapping(labels)),
            (
                Value::from("exp_annotations"),
                Value::Mapping(expected_annotations(c.alert, c.labels)),
            ),
        ]));
        let case = |at: &str, alerts: Vec<Value>| {
            Value::Mapping(serde_yaml::Mapping::from_iter([
                (Value::from("eval_time"), Value::from(at)),
                (Value::from("alertname"), Value::from(c.alert)),
                (Value::from("exp_alerts"), Value::Sequence(alerts)),
            ]))
        };
        tests.push(Value::Mapping(serde_yaml::Mapping::from_iter([
            (Value::from("name"), Value::from(c.alert)),
            (Value::from("interval"), Value::from("1m")),
            (Value::from("input_series"), Value::Sequence(series)),
            (
                Value::from("alert_rule_test"),
                Value::Sequence(vec![
                    case(c.quiet_at, vec![]),
                    case(c.fires_at, vec![firing]),
                ]),
            ),
        ])));
    }
    let file = serde_yaml::Mapping::from_iter([
        (
            Value::from("rule_files"),
            Value::Sequence(vec![Value::from("rules.yaml")]),
        ),
        (Value::from("evaluation_interval"), Value::from("1m")),
        (Value::from("tests"), Value::Sequence(tests)),
    ]);
    let test_file = dir.path().join("tests.yaml");
    std::fs::write(
        &test_file,
        serde_yaml::to_string(&file).expect("render tests"),
    )
    .expect("write tests");
    let out = Command::new("promtool")
        .arg("test")
        .arg("rules")
        .arg(&test_file)
        .current_dir(dir.path())
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool test rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `to` as a path relative to the directory `from` (both absolute).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let (from, to) = (
        from.canonicalize().expect("canonical from"),
        to.canonicalize().expect("canonical to"),
    );
    let common = from
        .components()
        .zip(to.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut out = PathBuf::new();
    for _ in from.components().skip(common) {
        out.push("..");
    }
    for c in to.components().skip(common) {
        out.push(c);
    }
    out
}
