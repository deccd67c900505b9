//! The module structure of every crate: no import circle among a crate's modules (a module that
//! uses another which, directly or not, uses it back). Read from the sources: each `crate::…`,
//! `super::…` and `self::…` path, and each path through a child module, is an edge to the
//! deepest module it names. A module's use of its own ancestors (a child calling a helper of its
//! parent) is the module tree itself and is not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// Every module of the crate rooted at `src` (lib.rs), with its file's text.
fn modules(src: &Path) -> BTreeMap<Module, String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(src, &mut files);
    let mut out = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap().with_extension("");
        let mut m: Module = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        match m.last().map(String::as_str) {
            Some("main") if m.len() == 1 => continue, // the binary is another crate
            Some("lib") if m.len() == 1 => m.clear(),
            Some("mod") => {
                m.pop();
            }
            _ => {}
        }
        out.insert(m, code_of(&std::fs::read_to_string(&f).unwrap()));
    }
    out
}

/// The source without comments and without its unit-test module.
fn code_of(src: &str) -> String {
    let src = match src.find("#[cfg(test)]\nmod tests") {
        Some(i) => &src[..i],
        None => src,
    };
    src.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The paths of `code` that start at `starts` (`crate`, `super`, `self` or a child module's
/// name), brace groups expanded one level: `super::{a::B, c}` gives `super::a::B`, `super::c`.
fn paths(code: &str, starts: &[String]) -> Vec<Vec<String>> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let boundary = i == 0 || !(is_ident(chars[i - 1]) || chars[i - 1] == ':');
        if !boundary || !is_ident(chars[i]) {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < chars.len() && is_ident(chars[j]) {
            j += 1;
        }
        let first: String = chars[i..j].iter().collect();
        if !starts.contains(&first) {
            i = j;
            continue;
        }
        let mut path = vec![first];
        loop {
            if chars.get(j) == Some(&':') && chars.get(j + 1) == Some(&':') {
                j += 2;
                if chars.get(j) == Some(&'{') {
                    let end = (j..chars.len()).find(|&k| chars[k] == '}').unwrap_or(j);
                    let group: String = chars[j + 1..end].iter().collect();
                    for part in group.split(',') {
                        let part = part.split(" as ").next().unwrap().trim();
                        if !part.is_empty() && !part.contains('{') {
                            let mut p = path.clone();
                            p.extend(part.split("::").map(|s| s.trim().to_string()));
                            out.push(p.clone());
                        }
                    }
                    j = end;
                    break;
                }
                let k0 = j;
                while j < chars.len() && is_ident(chars[j]) {
                    j += 1;
                }
                if j == k0 {
                    break;
                }
                path.push(chars[k0..j].iter().collect());
            } else {
                break;
            }
        }
        if path.len() > 1 {
            out.push(path);
        }
        i = j.max(i + 1);
    }
    out
}

/// Module → the other modules it uses.
fn edges(mods: &BTreeMap<Module, String>) -> BTreeMap<Module, BTreeSet<Module>> {
    let mut out = BTreeMap::new();
    for (m, code) in mods {
        let children: Vec<String> = mods
            .keys()
            .filter(|c| c.len() == m.len() + 1 && c.starts_with(m))
            .map(|c| c.last().unwrap().clone())
            .collect();
        let mut starts: Vec<String> = vec!["crate".into(), "super".into(), "self".into()];
        starts.extend(children);
        let mut to = BTreeSet::new();
        for p in paths(code, &starts) {
            let (mut base, mut rest) = (m.clone(), &p[..]);
            match p[0].as_str() {
                "crate" => {
                    base.clear();
                    rest = &p[1..];
                }
                "super" | "self" => {
                    let n = p
                        .iter()
                        .take_while(|s| *s == "super" || *s == "self")
                        .count();
                    for s in &p[..n] {
                        if s == "super" {
                            base.pop();
                        }
                    }
                    rest = &p[n..];
                }
                _ => {}
            }
            let mut best = base.clone();
            for seg in rest {
                let mut next = best.clone();
                next.push(seg.clone());
                if mods.contains_key(&next) {
                    best = next;
                } else {
                    break;
                }
            }
            // A module using its own ancestors (`super::helper`) is the tree itself, not a
            // circle: only edges to modules outside its own line count.
            let ancestor = best.len() < m.len() && m.starts_with(&best);
            if &best != m && !ancestor {
                to.insert(best);
            }
        }
        out.insert(m.clone(), to);
    }
    out
}

/// The strongly connected components with more than one module (Tarjan).
fn circles(g: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct T<'a> {
        g: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on: BTreeSet<&'a Module>,
        out: Vec<Vec<Module>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a Module) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flatten() {
            let Some((w, _)) = t.g.get_key_value(w) else {
                continue;
            };
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().unwrap();
                t.on.remove(w);
                comp.push(w.clone());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn crate_circles(src: &Path) -> Vec<String> {
    let g = edges(&modules(src));
    circles(&g)
        .into_iter()
        .map(|c| {
            let members: BTreeSet<&Module> = c.iter().collect();
            c.iter()
                .map(|m| {
                    let to: Vec<String> = g[m]
                        .iter()
                        .filter(|t| members.contains(t))
                        .map(name)
                        .collect();
                    format!("{} -> {}", name(m), to.join(", "))
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .collect()
}

#[test]
fn no_crate_has_an_import_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for krate in ["kernels", "vision", "lm", "app"] {
        let found = crate_circles(&root.join(krate).join("src"));
        assert!(found.is_empty(), "{krate}: import circles: {found:#?}");
    }
}

/// The detector itself finds a circle, through `super::` and through a child module's name.
#[test]
fn a_circle_is_found() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path();
    std::fs::create_dir_all(src.join("gui/view")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod gui;\n").unwrap();
    std::fs::write(
        src.join("gui/mod.rs"),
        "pub mod app;\npub mod view;\npub use app::App;\n",
    )
    .unwrap();
    std::fs::write(
        src.join("gui/app.rs"),
        "// super::view::frame in a comment is no edge\npub fn ui() { super::view::frame(); }\n",
    )
    .unwrap();
    std::fs::write(
        src.join("gui/view/mod.rs"),
        "use super::app::{self as a, ui};\npub fn frame() {}\n",
    )
    .unwrap();
    let found = crate_circles(src);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("gui::app -> gui::view"), "{found:?}");
    std::fs::write(
        src.join("gui/app.rs"),
        "// super::view::frame()\npub fn ui() {}\n",
    )
    .unwrap();
    assert!(crate_circles(src).is_empty());
}
