//! The crate's modules form layers: each may name only modules below it (ARCHITECTURE.md,
//! "Layers"). This test reads every source file's paths (`use` trees, paths in code and in
//! macro invocations, test modules included), builds the module graph and fails when a module
//! names one above it, unless that edge is one of the known ones being removed. A known edge
//! that is gone must leave the list too, so the list only shrinks.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::Path,
};

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// Lowest first. A module may name the modules before it.
const ORDER: &[&str] = &[
    // Wire types: the CRDs, Gateway API and core objects.
    "api",
    // Leaves: host facts and small utilities.
    "cgroups",
    "interfaces",
    "pressure",
    "metrics",
    "signal",
    "agent_client",
    // Live events (`weft tap`): the wire type and the hub the kernel's and the engine's meet in.
    "tap",
    // Identity: SPIFFE ids, certificates, the TLS configurations built from them.
    "identity",
    // The model: what the objects mean for one node.
    "state",
    // The kernel datapath and the L7 engine.
    "ebpf",
    "flows",
    "proxy",
    // Wiring: the CNI plugin, configuration, object sources and the controller, the admin
    // API, the agent, the CLI.
    "cni",
    "config",
    "control",
    "admin",
    "app",
    "cli",
];

/// Upward edges tolerated while they are being removed: `(from, to)`. None are left; a new one
/// is a design decision to discuss, not to list here.
const KNOWN_UPWARD: &[(&str, &str)] = &[];

#[derive(Default)]
struct Names {
    /// First path segment after `crate::` (or after a `super::` that means the crate root).
    modules: BTreeSet<String>,
    /// Whether `super` at the current point means the crate root.
    super_is_root: Vec<bool>,
}

impl Names {
    fn root_relative(&mut self, first: &str, second: Option<String>) {
        let root = match first {
            "crate" => true,
            "super" => self.super_is_root.last().copied().unwrap_or(false),
            _ => false,
        };
        if let (true, Some(m)) = (root, second) {
            self.modules.insert(m);
        }
    }

    fn use_tree(&mut self, tree: &syn::UseTree, prefix: Option<&str>) {
        match (tree, prefix) {
            (syn::UseTree::Path(p), None) => {
                let first = p.ident.to_string();
                if first == "crate" || first == "super" {
                    self.use_tree(&p.tree, Some(&first));
                }
            }
            (syn::UseTree::Path(p), Some(first)) => {
                self.root_relative(first, Some(p.ident.to_string()));
            }
            (syn::UseTree::Name(n), Some(first)) => {
                self.root_relative(first, Some(n.ident.to_string()));
            }
            (syn::UseTree::Rename(r), Some(first)) => {
                self.root_relative(first, Some(r.ident.to_string()));
            }
            (syn::UseTree::Group(g), prefix) => {
                for t in &g.items {
                    self.use_tree(t, prefix);
                }
            }
            _ => {}
        }
    }

    fn tokens(&mut self, tokens: TokenStream) {
        let flat: Vec<TokenTree> = tokens.into_iter().collect();
        for (i, t) in flat.iter().enumerate() {
            match t {
                TokenTree::Group(g) => self.tokens(g.stream()),
                TokenTree::Ident(id) if id == "crate" => {
                    // `crate` `:` `:` `module`
                    if let (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b))) =
                        (flat.get(i + 1), flat.get(i + 2))
                        && a.as_char() == ':'
                        && b.as_char() == ':'
                        && let Some(TokenTree::Ident(m)) = flat.get(i + 3)
                    {
                        self.modules.insert(m.to_string());
                    }
                }
                _ => {}
            }
        }
    }
}

impl<'ast> Visit<'ast> for Names {
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.use_tree(&u.tree, None);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let mut segments = p.segments.iter().map(|s| s.ident.to_string());
        if let Some(first) = segments.next() {
            self.root_relative(&first, segments.next());
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        // Inside an inline module, `super` is the file's own module.
        self.super_is_root.push(false);
        syn::visit::visit_item_mod(self, m);
        self.super_is_root.pop();
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.tokens(m.tokens.clone());
        syn::visit::visit_macro(self, m);
    }
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// module → the crate's modules it names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in all {
        let rel = path.strip_prefix(&src).unwrap();
        let mut parts = rel.iter().map(|p| p.to_string_lossy().into_owned());
        let first = parts.next().unwrap();
        let nested = parts.next().is_some();
        let module = first.trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" {
            continue; // the crate root and the binary: above every layer
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // In `x.rs` and `x/mod.rs`, `super` is the crate root; deeper, it is `x`.
        let is_mod_root = !nested || rel.file_name().is_some_and(|n| n == "mod.rs");
        let mut names = Names {
            super_is_root: vec![is_mod_root && rel.components().count() <= 2],
            ..Names::default()
        };
        names.visit_file(&file);
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(names.modules.into_iter().filter(|m| *m != module));
    }
    graph
}

#[test]
fn lower_layers_never_name_higher_ones() {
    let graph = graph();
    let rank = |m: &str| ORDER.iter().position(|o| *o == m);
    let mut unknown_modules = Vec::new();
    let mut upward = BTreeSet::new();
    for (from, tos) in &graph {
        let Some(f) = rank(from) else {
            unknown_modules.push(from.clone());
            continue;
        };
        for to in tos {
            // A name that is no module of the crate (a macro-exported item) is no edge.
            if rank(to).is_some_and(|t| t > f) {
                upward.insert((from.clone(), to.clone()));
            }
        }
    }
    let mut printed = String::new();
    for (m, tos) in &graph {
        let tos: Vec<&str> = tos.iter().map(String::as_str).collect();
        let _ = writeln!(printed, "  {m} -> {}", tos.join(", "));
    }
    assert!(
        unknown_modules.is_empty(),
        "modules without a layer: {unknown_modules:?}; give each its place in ORDER\n{printed}"
    );
    let known: BTreeSet<(String, String)> = KNOWN_UPWARD
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect();
    let new: Vec<_> = upward.difference(&known).collect();
    let gone: Vec<_> = known.difference(&upward).collect();
    assert!(
        new.is_empty(),
        "a lower layer now names a higher one: {new:?} (ORDER in this file)\n{printed}"
    );
    assert!(
        gone.is_empty(),
        "these upward edges are gone: remove them from KNOWN_UPWARD: {gone:?}\n{printed}"
    );
}

#[test]
fn api_names_nothing_else_of_weft() {
    let graph = graph();
    let api = graph.get("api").cloned().unwrap_or_default();
    let known: BTreeSet<&str> = ORDER.iter().copied().collect();
    let inner: Vec<&String> = api.iter().filter(|m| known.contains(m.as_str())).collect();
    assert!(inner.is_empty(), "api names {inner:?}");
}

/// The engine and the datapath run what the model compiled: they never read the wire types
/// (Weft's `api`, Gateway API's or Kubernetes' own), so a change of the CRDs' shape stops at
/// the model.
#[test]
fn the_engine_and_the_datapath_never_read_wire_types() {
    let graph = graph();
    for module in ["ebpf", "flows", "proxy"] {
        let names = graph.get(module).cloned().unwrap_or_default();
        assert!(!names.contains("api"), "{module} names api: {names:?}");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut all = Vec::new();
        let dir = src.join(module);
        if dir.is_dir() {
            files(&dir, &mut all);
        }
        all.push(src.join(format!("{module}.rs")));
        for path in all.iter().filter(|p| p.is_file()) {
            let text = std::fs::read_to_string(path).unwrap();
            for wire in ["gateway_api::", "k8s_openapi::"] {
                assert!(
                    !text.contains(wire),
                    "{} names {wire}: compile what it needs in the model",
                    path.display()
                );
            }
        }
    }
}
