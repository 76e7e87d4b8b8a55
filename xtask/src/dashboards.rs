//! `cargo xtask check-dashboards`: the monitoring files that ship with infermem, checked.
//!
//! - `dashboards/alerts.yml` with `promtool check rules`, and its unit tests
//!   (`dashboards/alerts.test.yml`, series that fire each alert) with `promtool test rules`;
//! - `dashboards/infermem.json`: a dashboard whose every panel has PromQL targets on the
//!   `$datasource` variable (the end-to-end test runs each query against a real Prometheus);
//! - `deploy/otel-collector.yaml` against `deploy/schemas/otel-collector.schema.json` with
//!   `check-jsonschema` (pinned, in a venv under `target/`), its pipelines cross-checked
//!   against the components it defines, and the schema itself shown to reject a set of broken
//!   variants of the real file.

use std::{collections::HashSet, path::Path, process::Command};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use crate::{
    cargo::{profile_dir, workspace_root},
    checks::{COMMAND_TIMEOUT, checked, output_within, pinned_venv, yaml_as_json},
};

/// check-jsonschema and everything it imports, pinned.
const CHECK_JSONSCHEMA: &[&str] = &[
    "check-jsonschema==0.39.0",
    "attrs==26.1.0",
    "certifi==2026.10.19.post1",
    "charset-normalizer==3.5.3",
    "click==8.5.1",
    "idna==3.20",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0",
    "regress==2026.9.1",
    "requests==2.34.2",
    "rpds-py==2026.9.1",
    "ruamel.yaml==0.19.1",
    "typing_extensions==4.16.0",
    "urllib3==2.8.0",
];

const ALERTS: &str = "dashboards/alerts.yml";
const ALERT_TESTS: &str = "dashboards/alerts.test.yml";
const DASHBOARD: &str = "dashboards/infermem.json";
const COLLECTOR: &str = "deploy/otel-collector.yaml";
const COLLECTOR_SCHEMA: &str = "deploy/schemas/otel-collector.schema.json";

/// Runs every check; fails on the first file that does not pass.
pub fn check() -> Result<()> {
    let root = workspace_root();
    promtool(&root, &["check", "rules", ALERTS])?;
    promtool(&root, &["test", "rules", ALERT_TESTS])?;
    let dashboard = std::fs::read_to_string(root.join(DASHBOARD))
        .with_context(|| format!("reading {DASHBOARD}"))?;
    let dashboard: Value =
        serde_json::from_str(&dashboard).with_context(|| format!("{DASHBOARD} is not JSON"))?;
    report(DASHBOARD, &dashboard_problems(&dashboard))?;
    println!("{DASHBOARD}: every panel has targets on $datasource");
    check_collector(&root)
}

/// `promtool <args>` in `root`, which must succeed; a missing promtool is an error that says
/// where it comes from.
fn promtool(root: &Path, args: &[&str]) -> Result<()> {
    checked(Command::new("promtool").args(args).current_dir(root)).map_err(|e| match e
        .downcast_ref::<std::io::Error>()
    {
        Some(io) if io.kind() == std::io::ErrorKind::NotFound => anyhow::anyhow!(
            "promtool is missing: install Debian's `prometheus` package (apt-get install \
                 prometheus), which brings promtool"
        ),
        _ => e,
    })
}

/// Fails listing `problems` of `file`, if any.
fn report(file: &str, problems: &[String]) -> Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    bail!("{file}:\n  {}", problems.join("\n  "))
}

/// What is wrong with the dashboard: the variables the queries rely on, and each panel's
/// targets (rows' nested panels included).
fn dashboard_problems(dashboard: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let variables = dashboard["templating"]["list"].as_array();
    let datasource_variable = variables.into_iter().flatten().any(|v| {
        v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"
    });
    if !datasource_variable {
        problems.push("no `datasource` variable of type datasource (prometheus)".to_owned());
    }
    let mut ids = HashSet::new();
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        if !ids.insert(panel["id"].to_string()) {
            problems.push(format!("panel {title:?}: id {} used twice", panel["id"]));
        }
        if panel["type"] != "row" {
            problems.extend(
                target_problems(panel)
                    .into_iter()
                    .map(|p| format!("panel {title:?}: {p}")),
            );
        }
    }
    problems
}

/// Every panel of the dashboard, rows and the panels nested in collapsed rows included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, into: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            into.push(panel);
            walk(&panel["panels"], into);
        }
    }
    let mut all = Vec::new();
    walk(&dashboard["panels"], &mut all);
    all
}

/// Whether `datasource` is the dashboard's Prometheus variable.
fn on_datasource_variable(datasource: &Value) -> bool {
    datasource["type"] == "prometheus" && datasource["uid"] == "${datasource}"
}

/// What is wrong with one (non-row) panel's targets.
fn target_problems(panel: &Value) -> Vec<String> {
    let targets = panel["targets"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if targets.is_empty() {
        return vec!["no targets".to_owned()];
    }
    let mut problems = Vec::new();
    let mut ref_ids = HashSet::new();
    for target in targets {
        let ref_id = target["refId"].as_str().unwrap_or_default();
        if ref_id.is_empty() || !ref_ids.insert(ref_id) {
            problems.push(format!(
                "a target's refId {ref_id:?} is missing or repeated"
            ));
        }
        if target["expr"].as_str().is_none_or(|e| e.trim().is_empty()) {
            problems.push(format!("target {ref_id}: no PromQL expr"));
        }
        let datasource = if target["datasource"].is_null() {
            &panel["datasource"]
        } else {
            &target["datasource"]
        };
        if !on_datasource_variable(datasource) {
            problems.push(format!(
                "target {ref_id}: datasource {datasource} is not the $datasource variable"
            ));
        }
    }
    problems
}

/// The collector configuration: schema, cross-references, and the schema's teeth.
fn check_collector(root: &Path) -> Result<()> {
    let bin = pinned_venv("dashboards-venv", CHECK_JSONSCHEMA)?;
    let checker = bin.join("check-jsonschema");
    let schema = root.join(COLLECTOR_SCHEMA);
    checked(
        Command::new(&checker)
            .arg("--check-metaschema")
            .arg(&schema),
    )?;
    let config_path = root.join(COLLECTOR);
    schema_check(&checker, &schema, &config_path)?;
    let config = yaml_as_json(&bin.join("python"), YAML_TO_JSON, &config_path)?;
    report(COLLECTOR, &cross_reference_problems(&config))?;
    println!("{COLLECTOR}: every pipeline refers to defined components, each one used");
    schema_rejects_broken_variants(&checker, &schema, &config)
}

/// `check-jsonschema` of `instance` against `schema`, which must pass.
fn schema_check(checker: &Path, schema: &Path, instance: &Path) -> Result<()> {
    checked(
        Command::new(checker)
            .arg("--schemafile")
            .arg(schema)
            .arg(instance),
    )
}

/// Reads YAML as JSON with ruamel.yaml (which check-jsonschema itself parses YAML with).
const YAML_TO_JSON: &str = "import json, sys\nfrom ruamel.yaml import YAML\n\
     json.dump(YAML(typ='safe', pure=True).load(open(sys.argv[1])), sys.stdout)";

/// The ids of the components defined in `section`.
fn defined<'a>(config: &'a Value, section: &str) -> HashSet<&'a str> {
    config[section]
        .as_object()
        .map(|m| m.keys().map(String::as_str).collect())
        .unwrap_or_default()
}

/// The strings of a list of component ids.
fn listed(list: &Value) -> Vec<&str> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// What the Collector would refuse (a pipeline or `service.extensions` naming a component
/// not defined) or silently ignore (a component defined but never used).
fn cross_reference_problems(config: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let mut used: HashSet<(&str, &str)> = HashSet::new();
    let mut refer = |section: &'static str, what: String, name| {
        used.insert((section, name));
        if !defined(config, section).contains(name) {
            problems.push(format!("{what}: {name:?} is not defined"));
        }
    };
    let pipelines = config["service"]["pipelines"].as_object();
    for (pipeline, spec) in pipelines.into_iter().flatten() {
        for section in ["receivers", "processors", "exporters"] {
            for name in listed(&spec[section]) {
                refer(section, format!("pipeline {pipeline}: {section}"), name);
            }
        }
    }
    for name in listed(&config["service"]["extensions"]) {
        refer("extensions", "service.extensions".to_owned(), name);
    }
    for section in ["receivers", "processors", "exporters", "extensions"] {
        let mut unused: Vec<_> = defined(config, section)
            .into_iter()
            .filter(|name| !used.contains(&(section, *name)))
            .collect();
        unused.sort_unstable();
        problems.extend(
            unused
                .iter()
                .map(|name| format!("{section}: {name:?} is never used")),
        );
    }
    problems
}

/// A broken variant of the real configuration that the schema must reject.
struct Variant {
    name: &'static str,
    /// Breaks the config; `None` when the config no longer has what it breaks.
    apply: fn(&mut Value) -> Option<()>,
}

/// The mistakes the schema is there to catch, each made on the real file.
const VARIANTS: &[Variant] = &[
    Variant {
        name: "a misspelt option",
        apply: |c| {
            let limiter = c
                .pointer_mut("/processors/memory_limiter")?
                .as_object_mut()?;
            limiter.insert("limit_percentag".into(), 80.into());
            Some(())
        },
    },
    Variant {
        name: "an unknown component type",
        apply: |c| {
            let exporters = c.pointer_mut("/exporters")?.as_object_mut()?;
            let prw = exporters.get("prometheusremotewrite")?.clone();
            exporters.insert("prometheus_remote_write".into(), prw);
            Some(())
        },
    },
    Variant {
        name: "a metrics-only exporter in a logs pipeline",
        apply: |c| {
            let exporters = c.pointer_mut("/service/pipelines/logs/exporters")?;
            exporters
                .as_array_mut()?
                .push("prometheusremotewrite".into());
            Some(())
        },
    },
    Variant {
        name: "memory_limiter not first",
        apply: |c| {
            let processors = c.pointer_mut("/service/pipelines/logs/processors")?;
            processors.as_array_mut()?.reverse();
            Some(())
        },
    },
    Variant {
        name: "a duration without a unit",
        apply: |c| {
            *c.pointer_mut("/processors/batch/timeout")? = "5 seconds".into();
            Some(())
        },
    },
    Variant {
        name: "an insert with no value",
        apply: |c| {
            let action = c.pointer_mut("/processors/resource/attributes/0")?;
            action.as_object_mut()?.remove("value")?;
            Some(())
        },
    },
    Variant {
        name: "a pipeline of no signal",
        apply: |c| {
            let pipelines = c.pointer_mut("/service/pipelines")?.as_object_mut()?;
            let logs = pipelines.get("logs")?.clone();
            pipelines.insert("metric".into(), logs);
            Some(())
        },
    },
    Variant {
        name: "an OTLP receiver without protocols",
        apply: |c| {
            *c.pointer_mut("/receivers/otlp")? = serde_json::json!({});
            Some(())
        },
    },
];

/// Shows that the schema has teeth: each of [`VARIANTS`] made on the real configuration must
/// fail `check-jsonschema`.
fn schema_rejects_broken_variants(checker: &Path, schema: &Path, config: &Value) -> Result<()> {
    let dir = profile_dir(false).join("check-dashboards");
    std::fs::create_dir_all(&dir)?;
    for (index, variant) in VARIANTS.iter().enumerate() {
        let mut broken = config.clone();
        (variant.apply)(&mut broken)
            .with_context(|| format!("{:?} no longer applies to {COLLECTOR}", variant.name))?;
        let path = dir.join(format!("variant-{index}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(&broken)?)?;
        let output = output_within(
            Command::new(checker)
                .arg("--schemafile")
                .arg(schema)
                .arg(&path),
            COMMAND_TIMEOUT,
        )?;
        ensure!(
            !output.status.success(),
            "{COLLECTOR_SCHEMA} accepts {COLLECTOR} with {} ({})",
            variant.name,
            path.display()
        );
    }
    println!(
        "{COLLECTOR_SCHEMA}: rejects the {} broken variants",
        VARIANTS.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn minimal_collector() -> Value {
        json!({
            "extensions": {"health_check": null},
            "receivers": {"otlp": {"protocols": {"grpc": null}}},
            "processors": {"memory_limiter": {}, "batch": null},
            "exporters": {"otlphttp": {"endpoint": "http://backend:4318"}},
            "service": {
                "extensions": ["health_check"],
                "pipelines": {"logs": {
                    "receivers": ["otlp"],
                    "processors": ["memory_limiter", "batch"],
                    "exporters": ["otlphttp"],
                }},
            },
        })
    }

    #[test]
    fn a_wired_collector_has_no_cross_reference_problem() {
        assert_eq!(
            cross_reference_problems(&minimal_collector()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn undefined_and_unused_components_are_problems() {
        let mut config = minimal_collector();
        config["service"]["pipelines"]["logs"]["processors"] =
            json!(["memory_limiter", "batch/big"]);
        config["service"]["extensions"] = json!(["pprof"]);
        config["exporters"]["debug"] = Value::Null;
        assert_eq!(
            cross_reference_problems(&config),
            [
                "pipeline logs: processors: \"batch/big\" is not defined",
                "service.extensions: \"pprof\" is not defined",
                "processors: \"batch\" is never used",
                "exporters: \"debug\" is never used",
                "extensions: \"health_check\" is never used",
            ]
        );
    }

    fn dashboard(panels: Value) -> Value {
        json!({
            "templating": {"list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
            ]},
            "panels": panels,
        })
    }

    const DS: &str = "${datasource}";

    #[test]
    fn a_dashboard_with_targets_on_the_variable_passes() {
        let ok = dashboard(json!([
            {"id": 1, "type": "row", "title": "r", "panels": [
                {"id": 2, "type": "stat", "title": "nested",
                 "datasource": {"type": "prometheus", "uid": DS},
                 "targets": [{"refId": "A", "expr": "up"}]},
            ]},
            {"id": 3, "type": "timeseries", "title": "own datasource",
             "targets": [{"refId": "A", "expr": "up",
                          "datasource": {"type": "prometheus", "uid": DS}}]},
        ]));
        assert_eq!(dashboard_problems(&ok), Vec::<String>::new());
    }

    #[test]
    fn dashboard_mistakes_are_problems() {
        let broken = dashboard(json!([
            {"id": 1, "type": "row", "title": "r", "panels": [
                {"id": 2, "type": "stat", "title": "empty", "targets": []},
            ]},
            {"id": 2, "type": "timeseries", "title": "bad",
             "datasource": {"type": "prometheus", "uid": "abc"},
             "targets": [{"refId": "A", "expr": "up"}, {"refId": "A", "expr": " "}]},
        ]));
        assert_eq!(
            dashboard_problems(&broken),
            [
                "panel \"empty\": no targets",
                "panel \"bad\": id 2 used twice",
                "panel \"bad\": target A: datasource {\"type\":\"prometheus\",\"uid\":\"abc\"} \
                 is not the $datasource variable",
                "panel \"bad\": a target's refId \"A\" is missing or repeated",
                "panel \"bad\": target A: no PromQL expr",
                "panel \"bad\": target A: datasource {\"type\":\"prometheus\",\"uid\":\"abc\"} \
                 is not the $datasource variable",
            ]
        );
        let no_variable = json!({"panels": []});
        assert_eq!(dashboard_problems(&no_variable).len(), 1);
    }

    #[test]
    fn every_variant_applies_to_a_full_config() {
        let mut config = minimal_collector();
        config["processors"]["resource"] =
            json!({"attributes": [{"key": "k", "value": "v", "action": "upsert"}]});
        config["processors"]["batch"] = json!({"timeout": "5s"});
        config["exporters"]["prometheusremotewrite"] = json!({"endpoint": "http://p"});
        for variant in VARIANTS {
            let mut broken = config.clone();
            assert!((variant.apply)(&mut broken).is_some(), "{}", variant.name);
            assert_ne!(broken, config, "{}", variant.name);
        }
    }
}
