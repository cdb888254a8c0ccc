//! The layering ARCHITECTURE.md describes, checked on the source text so a
//! change that breaks it fails here instead of in a review: no import
//! cycles between modules, the outbox below the reporters, reporters and
//! the tracker independent of the sources and the batcher, and `config`
//! an assembler that no component depends on.
//!
//! A module's dependencies are the `crate::...` paths in its code (comments
//! and doc comments are not dependencies). A parent naming its own children
//! (`pub use kafka::config::...`) is not a dependency either: that is how a
//! module is put together, not layering.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/`, as (module path, file text).
/// Every `.rs` file under `dir`, recursively.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn modules() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(&src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            let name = if parts.is_empty() {
                "crate".to_string()
            } else {
                parts.join("::")
            };
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

/// The `crate::a::b::...` paths in `text`, comment lines left out.
fn crate_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("//") {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let path: String = after
                .chars()
                .take_while(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == ':'
                })
                .collect();
            let path = path.trim_end_matches(':').to_string();
            if !path.is_empty() {
                out.push(path);
            }
            rest = after;
        }
    }
    out
}

/// Module-to-module dependencies: each path resolved to the longest
/// module it names.
fn dependencies(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, text) in mods {
        let entry = deps.entry(m.clone()).or_default();
        for p in crate_paths(text) {
            let parts: Vec<&str> = p.split("::").collect();
            let target = (1..=parts.len())
                .rev()
                .map(|n| parts[..n].join("::"))
                .find(|c| mods.contains_key(c));
            if let Some(t) = target
                && t != *m
                && !t.starts_with(&format!("{m}::"))
            {
                entry.insert(t);
            }
        }
    }
    deps
}

/// One cycle in `graph`, if any (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for next in g.get(n).into_iter().flatten() {
            match state.get(next.as_str()).copied().unwrap_or(0) {
                1 => {
                    let from = stack.iter().position(|s| s == next).unwrap();
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(next, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0
            && let Some(c) = visit(n, graph, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

fn top(m: &str) -> &str {
    m.split("::").next().unwrap()
}

fn under(m: &str, prefix: &str) -> bool {
    m == prefix || m.starts_with(&format!("{prefix}::"))
}

/// Every (module, dependency) edge where the module is under `from` and
/// the dependency under `to`.
fn edges(deps: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> Vec<(String, String)> {
    deps.iter()
        .filter(|(m, _)| under(m, from))
        .flat_map(|(m, ds)| {
            ds.iter()
                .filter(|d| under(d, to))
                .map(move |d| (m.clone(), d.clone()))
        })
        .collect()
}

#[test]
fn no_import_cycles_between_modules() {
    let deps = dependencies(&modules());
    assert!(deps.len() > 30, "found only {} modules", deps.len());
    assert_eq!(find_cycle(&deps), None, "a cycle among modules");
    // The same at the level of the top-level modules.
    let mut tops: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, ds) in &deps {
        let e = tops.entry(top(m).to_string()).or_default();
        e.extend(
            ds.iter()
                .map(|d| top(d).to_string())
                .filter(|d| d != top(m)),
        );
    }
    assert_eq!(find_cycle(&tops), None, "a cycle among top-level modules");
}

#[test]
fn the_layers_depend_only_downwards() {
    let deps = dependencies(&modules());
    // The store sits below the stages that use it.
    assert_eq!(edges(&deps, "outbox", "report"), vec![]);
    // Reporters and the tracker work from outbox records, never from a
    // source's internals or the batcher's.
    for from in ["report", "track"] {
        assert_eq!(edges(&deps, from, "source"), vec![], "{from} -> source");
        assert_eq!(
            edges(&deps, from, "deliver::batcher"),
            vec![],
            "{from} -> batcher"
        );
    }
    // `config` assembles the components' sections; only the top (the
    // wiring, the command line, the demo, SIGHUP reload and the start-up
    // queue check) reads it.
    let readers: BTreeSet<&str> = deps
        .iter()
        .filter(|(_, ds)| ds.iter().any(|d| under(d, "config")))
        .map(|(m, _)| m.as_str())
        .filter(|m| !under(m, "config"))
        .collect();
    assert_eq!(
        readers,
        BTreeSet::from(["app", "cli", "demo", "preflight", "reload"]),
        "modules that import config"
    );
}

#[test]
fn config_holds_only_the_top_level_types() {
    let mods = modules();
    let text = &mods["config"];
    let types: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l.strip_prefix("pub ").unwrap_or(l);
            let rest = l
                .strip_prefix("struct ")
                .or_else(|| l.strip_prefix("enum "))?;
            rest.split(|c: char| !c.is_alphanumeric() && c != '_')
                .next()
        })
        .collect();
    assert_eq!(types, vec!["Config", "ConfigErrors"]);
}

#[test]
fn the_checks_see_what_they_check() {
    // The scanner itself: a comment is no dependency, a path is resolved to
    // the module it names, and a cycle is found.
    assert_eq!(
        crate_paths("// crate::a::b\nuse crate::outbox::Report;\nlet x = crate::clock::now_ms();"),
        vec!["outbox", "clock::now_ms"]
    );
    let mut mods = BTreeMap::new();
    mods.insert("a".to_string(), "use crate::b::X;".to_string());
    mods.insert("b".to_string(), "use crate::a::sub::Y;".to_string());
    mods.insert("a::sub".to_string(), String::new());
    let deps = dependencies(&mods);
    assert_eq!(deps["a"], BTreeSet::from(["b".to_string()]));
    assert_eq!(deps["b"], BTreeSet::from(["a::sub".to_string()]));
    assert_eq!(find_cycle(&deps), None);
    mods.insert("a::sub".to_string(), "use crate::b::Z;".to_string());
    let deps = dependencies(&mods);
    assert!(find_cycle(&deps).is_some());
}

/// The top-level modules bottom-up, in the order ARCHITECTURE.md's code
/// map lists them: each may import only those before it.
const LAYERS: &[&str] = &[
    "allocator",
    "clock",
    "encoding",
    "secret",
    "retry",
    "kafka",
    "listener",
    "duvo",
    "raw_json",
    "mapping",
    "routing",
    "admin",
    "shutdown",
    "telemetry",
    "outbox",
    "deliver",
    "track",
    "report",
    "source",
    "sim",
    "systemd",
    "config",
    "reload",
    "preflight",
    "operator",
    "top",
    "app",
    "demo",
    "cli",
];

#[test]
fn each_top_level_module_imports_only_those_listed_before_it() {
    let deps = dependencies(&modules());
    let tops: BTreeSet<&str> = deps
        .keys()
        .map(|m| top(m))
        .filter(|m| *m != "crate")
        .collect();
    assert_eq!(
        tops,
        LAYERS.iter().copied().collect::<BTreeSet<_>>(),
        "LAYERS must list every top-level module"
    );
    let rank = |m: &str| LAYERS.iter().position(|l| *l == top(m));
    let mut upward = Vec::new();
    for (m, ds) in &deps {
        let Some(r) = rank(m) else { continue };
        for d in ds {
            if top(d) != top(m) && rank(d).is_some_and(|rd| rd > r) {
                upward.push(format!("{m} -> {d}"));
            }
        }
    }
    assert_eq!(upward, Vec::<String>::new(), "imports of a higher layer");
}

#[test]
fn architecture_md_names_every_module_once_per_paragraph() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md"))
            .unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut missing = Vec::new();
    let mut files = Vec::new();
    walk(&src, &mut files);
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        // `a/b.rs` by path, or a directory's files as `a/` plus `b.rs`.
        let named = doc.contains(&format!("`{rel}`"))
            || rel.rsplit_once('/').is_some_and(|(dir, file)| {
                doc.contains(&format!("`{dir}/`")) && doc.contains(&format!("`{file}`"))
            });
        if !named {
            missing.push(rel);
        }
    }
    assert_eq!(
        missing,
        Vec::<String>::new(),
        "modules ARCHITECTURE.md does not name"
    );
    // No paragraph (or bullet) appears twice.
    let mut seen = BTreeSet::new();
    for para in doc.split("\n\n").flat_map(|p| p.split("\n- ")) {
        let p = para.split_whitespace().collect::<Vec<_>>().join(" ");
        if p.len() > 40 {
            assert!(seen.insert(p.clone()), "repeated paragraph: {p}");
        }
    }
}

/// The docs name the tests that check each claim (`tests/gate.rs::name`,
/// `deliver::gate::tests::name`); a renamed or deleted test must not leave
/// a claim pointing at nothing.
#[test]
fn every_test_the_docs_name_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let defines = |text: &str, name: &str| {
        text.match_indices(&format!("fn {name}")).any(|(i, m)| {
            !text[i + m.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
        })
    };
    let mut checked = 0;
    let mut missing = Vec::new();
    for doc in [
        "ARCHITECTURE.md",
        "RELIABILITY.md",
        "BENCHMARKS.md",
        "README.md",
    ] {
        let text = read(&root.join(doc));
        for token in text.split('`').skip(1).step_by(2) {
            let found = if let Some((file, name)) = token
                .strip_prefix("tests/")
                .and_then(|t| t.split_once(".rs::"))
            {
                defines(&read(&root.join(format!("tests/{file}.rs"))), name)
            } else if let Some((module, name)) = token.split_once("::tests::") {
                // The module's own file or anything under its directory.
                let path = root.join("src").join(module.replace("::", "/"));
                let mut files = Vec::new();
                if path.is_dir() {
                    walk(&path, &mut files);
                }
                files.push(path.with_extension("rs"));
                files.iter().any(|f| defines(&read(f), name))
            } else {
                continue;
            };
            checked += 1;
            if !found {
                missing.push(format!("{doc}: {token}"));
            }
        }
    }
    assert!(checked > 50, "only {checked} test names found in the docs");
    assert_eq!(
        missing,
        Vec::<String>::new(),
        "tests the docs name that do not exist"
    );
}
