//! The queries of the Grafana dashboard (`dashboards/infermem.json`) with its variables filled
//! in the way Grafana's Prometheus data source fills them, so that a test can run each one
//! against a real Prometheus.

use std::collections::HashSet;

use serde_json::Value;

/// One target of one panel: what Grafana would send to Prometheus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DashboardQuery {
    /// The panel's title (as written, variables not filled in).
    pub panel: String,
    /// The target's `refId` (`A`, `B`, ...).
    pub ref_id: String,
    /// The PromQL expression, every variable substituted.
    pub expr: String,
}

/// Fixed values of Grafana's built-in interval variables: `$__rate_interval` at least four
/// scrapes of a 15-s job, `$__interval` one step, `$__range` a 5-minute dashboard.
const BUILT_INS: &[(&str, &str)] = &[
    ("__rate_interval", "1m"),
    ("__interval", "15s"),
    ("__range", "5m"),
];

/// Every target with an `expr` in every panel of the dashboard (panels nested in collapsed
/// rows included), with the dashboard variables replaced by `vars` (name, value) and the
/// built-in intervals by fixed durations. Panics on JSON that is not a dashboard, and on a
/// variable that neither `vars` nor the built-ins know.
pub fn queries(dashboard_json: &str, vars: &[(&str, &str)]) -> Vec<DashboardQuery> {
    let dashboard: Value = serde_json::from_str(dashboard_json).expect("the dashboard is JSON");
    let regex_vars = multi_value_variables(&dashboard);
    let mut found = Vec::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let Some(expr) = target["expr"].as_str() else {
                continue;
            };
            let expr = substitute(expr, vars, &regex_vars)
                .unwrap_or_else(|e| panic!("panel {title:?}: {e} in {expr:?}"));
            found.push(DashboardQuery {
                panel: title.to_owned(),
                ref_id: target["refId"].as_str().unwrap_or_default().to_owned(),
                expr,
            });
        }
    }
    found
}

/// Series that exist only with NVML, which needs a real NVIDIA GPU and driver.
const NVML_SERIES: &[&str] = &[
    "infermem_process_gpu_memory_nvml_usage_bytes",
    "infermem_hw_gpu_",
    "infermem_gpu_memory_nvml_minus_ioctl_bytes",
];

/// Series that exist only while the agent decodes a driver's RM ioctls (state `tracking`);
/// the dashboard test's agent runs without a driver (state `no_gpu`).
const IOCTL_SERIES: &[&str] = &[
    "infermem_process_gpu_memory_usage_bytes",
    "infermem_process_gpu_host_pinned_bytes",
    "infermem_gpu_memory_ioctl_usage_bytes",
    "infermem_gpu_ioctls_total",
    "infermem_gpu_unknown_class_objects_total",
];

/// Why `query` may legitimately return no data in CI, or `None` when it must return some.
pub fn may_be_empty(query: &DashboardQuery) -> Option<&'static str> {
    let uses = |series: &[&str]| series.iter().any(|s| query.expr.contains(s));
    if uses(NVML_SERIES) {
        Some("no GPU in CI: NVML has no device")
    } else if uses(IOCTL_SERIES) {
        Some("no NVIDIA driver in CI: the agent decodes no RM ioctls (tests/gpu.rs covers them)")
    } else {
        None
    }
}

/// Every panel that is not a row, in order, with the panels of collapsed rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, into: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            if panel["type"] != "row" {
                into.push(panel);
            }
            walk(&panel["panels"], into);
        }
    }
    let mut all = Vec::new();
    walk(&dashboard["panels"], &mut all);
    all
}

/// The variables Grafana regex-escapes when it fills them in a Prometheus query: the
/// multi-value ones and those with an "All" option.
fn multi_value_variables(dashboard: &Value) -> HashSet<String> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["multi"] == true || v["includeAll"] == true)
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect()
}

/// `expr` with `$name`, `${name}`, `${name:format}`, `[[name]]` and `[[name:format]]`
/// replaced; an error names the first reference it cannot fill.
fn substitute(
    expr: &str,
    vars: &[(&str, &str)],
    regex_vars: &HashSet<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(start) = rest.find(['$', '[']) {
        out.push_str(&rest[..start]);
        let Some((reference, len)) = parse_reference(&rest[start..]) else {
            out.push_str(&rest[start..start + 1]);
            rest = &rest[start + 1..];
            continue;
        };
        out.push_str(&fill(&reference, vars, regex_vars)?);
        rest = &rest[start + len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A variable reference: its name and its `:format`, if any.
#[derive(Debug, PartialEq, Eq)]
struct Reference<'a> {
    name: &'a str,
    format: Option<&'a str>,
}

/// The reference at the start of `text` and its length in bytes; `None` when `text` starts
/// with a `$` or `[` that is no reference (a PromQL range like `[5m]`, say).
fn parse_reference(text: &str) -> Option<(Reference<'_>, usize)> {
    let (inner, len) = if let Some(braced) = text.strip_prefix("${") {
        let end = braced.find('}')?;
        (&braced[..end], end + 3)
    } else if let Some(bracketed) = text.strip_prefix("[[") {
        let end = bracketed.find("]]")?;
        (&bracketed[..end], end + 4)
    } else {
        let name = text.strip_prefix('$')?;
        let end = name
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(name.len());
        (&name[..end], end + 1)
    };
    let (name, format) = match inner.split_once(':') {
        Some((name, format)) => (name, Some(format)),
        None => (inner, None),
    };
    let is_name = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    is_name.then_some((Reference { name, format }, len))
}

/// The text Grafana puts in place of `reference`.
fn fill(
    reference: &Reference<'_>,
    vars: &[(&str, &str)],
    regex_vars: &HashSet<String>,
) -> Result<String, String> {
    let name = reference.name;
    let value = BUILT_INS
        .iter()
        .chain(vars)
        .find(|(known, _)| *known == name)
        .map(|(_, value)| *value)
        .ok_or_else(|| format!("variable {name:?} has no value"))?;
    match reference.format {
        None if regex_vars.contains(name) => Ok(promql_regex_escape(value)),
        None | Some("raw") => Ok(value.to_owned()),
        Some("regex") => Ok(regex_escape(value)),
        Some(other) => Err(format!(
            "format {other:?} of variable {name:?} is not supported"
        )),
    }
}

/// Characters that mean something in a regular expression.
const REGEX_SPECIAL: &str = "\\^$.|?*+()[]{}'";

/// Grafana's escaping of a multi-value variable in a Prometheus query: each regex
/// metacharacter behind a backslash, doubled because the value lands in a PromQL string.
fn promql_regex_escape(value: &str) -> String {
    value.chars().fold(String::new(), |mut out, c| {
        if REGEX_SPECIAL.contains(c) {
            out.push_str("\\\\");
        }
        out.push(c);
        out
    })
}

/// Grafana's `:regex` format: each regex metacharacter behind one backslash.
fn regex_escape(value: &str) -> String {
    value.chars().fold(String::new(), |mut out, c| {
        if REGEX_SPECIAL.contains(c) {
            out.push('\\');
        }
        out.push(c);
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real dashboard, as CI checks it in.
    fn real_dashboard() -> String {
        let path = crate::workspace_root().join("dashboards/infermem.json");
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    const VARS: &[(&str, &str)] = &[("instance", "127.0.0.1:9464"), ("pid", "4242")];

    #[test]
    fn every_panel_of_the_real_dashboard_has_a_query() {
        let json = real_dashboard();
        let dashboard: Value = serde_json::from_str(&json).expect("JSON");
        let found = queries(&json, VARS);
        let titles: Vec<&str> = panels(&dashboard)
            .iter()
            .map(|p| p["title"].as_str().expect("every panel has a title"))
            .collect();
        assert!(titles.len() >= 20, "{titles:?}");
        for title in titles {
            assert!(
                found.iter().any(|q| q.panel == title),
                "panel {title:?} has no query"
            );
        }
        let collapsed = found
            .iter()
            .any(|q| q.panel == "Cgroup memory against limit");
        assert!(collapsed, "the collapsed rows' panels are walked too");
    }

    #[test]
    fn the_real_dashboard_queries_are_filled_in() {
        let found = queries(&real_dashboard(), VARS);
        for query in &found {
            assert!(!query.expr.trim().is_empty(), "{query:?}");
            assert!(!query.ref_id.is_empty(), "{query:?}");
            assert!(!query.expr.contains('$'), "a variable is left: {query:?}");
            assert!(!query.expr.contains("[["), "a variable is left: {query:?}");
        }
        let risk = found
            .iter()
            .find(|q| q.panel == "Risk")
            .expect("the risk timeline");
        assert_eq!(
            risk.expr,
            r#"infermem_process_risk_level{instance=~"127\\.0\\.0\\.1:9464", pid=~"4242"}"#
        );
        let rates = found.iter().filter(|q| q.expr.contains("rate("));
        assert!(rates.clone().count() >= 3);
        assert!(rates.clone().all(|q| q.expr.contains("[1m])")), "{found:?}");
    }

    #[test]
    fn only_the_gpu_panels_may_be_empty() {
        let found = queries(&real_dashboard(), VARS);
        let mut empty: Vec<_> = found
            .iter()
            .filter_map(|q| may_be_empty(q).map(|_| q.panel.as_str()))
            .collect();
        empty.dedup();
        assert_eq!(
            empty,
            [
                "GPU memory",
                "GPU memory per device",
                "GPU utilization",
                "NVML used minus ioctls",
                "NVIDIA ioctls"
            ]
        );
    }

    /// A one-panel dashboard with one multi-value variable `m` and a single-value `s`.
    fn one_panel(expr: &str) -> String {
        serde_json::json!({
            "templating": {"list": [
                {"name": "m", "multi": true, "includeAll": true},
                {"name": "s", "multi": false, "includeAll": false},
            ]},
            "panels": [{"type": "row", "title": "r", "collapsed": true, "panels": [
                {"type": "stat", "title": "p", "targets": [{"refId": "A", "expr": expr}]},
            ]}],
        })
        .to_string()
    }

    fn fill_one(expr: &str) -> String {
        let vars = [("m", "a.b"), ("s", "x.y"), ("dollar", "$0")];
        let found = queries(&one_panel(expr), &vars);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].panel.as_str(), found[0].ref_id.as_str()),
            ("p", "A")
        );
        found[0].expr.clone()
    }

    #[test]
    fn each_syntax_is_filled_in() {
        assert_eq!(fill_one("$s ${s} [[s]] ${s:raw}"), "x.y x.y x.y x.y");
        assert_eq!(fill_one(r#"{a=~"$m"}"#), r#"{a=~"a\\.b"}"#);
        assert_eq!(fill_one(r#"{a=~"${m}|[[m]]"}"#), r#"{a=~"a\\.b|a\\.b"}"#);
        assert_eq!(fill_one("${s:regex}"), r"x\.y");
        assert_eq!(
            fill_one("${dollar}"),
            "$0",
            "values are not filled in again"
        );
    }

    #[test]
    fn built_in_intervals_are_fixed_durations() {
        assert_eq!(
            fill_one("rate(x[$__rate_interval]) + increase(x[${__range}]) + y[[[__interval]]]"),
            "rate(x[1m]) + increase(x[5m]) + y[15s]"
        );
    }

    #[test]
    fn promql_that_looks_like_a_reference_is_left_alone() {
        assert_eq!(
            fill_one("x[5m] and y[1m:15s] or $ or $$"),
            "x[5m] and y[1m:15s] or $ or $$"
        );
    }

    #[test]
    #[should_panic(expected = "variable \"nope\" has no value")]
    fn an_unknown_variable_fails() {
        fill_one("x{a=\"$nope\"}");
    }

    #[test]
    #[should_panic(expected = "format \"csv\"")]
    fn an_unknown_format_fails() {
        fill_one("${s:csv}");
    }
}
