//! The repository is self-contained and its documents hold together: nothing reads the
//! sibling folder the fixtures came from, property tests keep their failures under target/,
//! the committed fixtures are the ones their README describes, every relative link in the
//! README and docs/ resolves, and CI runs the README's test command.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every file of the source tree (target/, models/ and .git left out), sorted.
fn tree_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                if dir == root() && matches!(name.as_str(), "target" | "models" | ".git") {
                    continue;
                }
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(root(), &mut out);
    out
}

fn text(p: &Path) -> Option<String> {
    String::from_utf8(std::fs::read(p).ok()?).ok()
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap().display().to_string()
}

#[test]
fn nothing_reads_the_sibling_shared_folder() {
    // Spelled in two parts so that this file does not match itself.
    let needle = format!("{}/shared", "..");
    let files = tree_files();
    assert!(files.len() > 50, "walked only {} files", files.len());
    let hits: Vec<String> = files
        .iter()
        .filter_map(|p| {
            let t = text(p)?;
            let lines: Vec<String> = t
                .lines()
                .enumerate()
                .filter(|(_, l)| l.contains(&needle))
                .map(|(i, l)| format!("{}:{}: {}", rel(p), i + 1, l.trim()))
                .collect();
            (!lines.is_empty()).then(|| lines.join("\n"))
        })
        .collect();
    assert!(
        hits.is_empty(),
        "the repository must be self-contained (copy what is needed into tests/fixtures or \
         scripts/):\n{}",
        hits.join("\n")
    );
}

#[test]
fn property_tests_keep_failures_under_target() {
    let mut blocks = 0;
    for p in tree_files() {
        if p.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let t = text(&p).unwrap();
        for (at, _) in t.match_indices("proptest! {") {
            blocks += 1;
            // The block's config comes first in the block.
            let head: String = t[at..].chars().take(600).collect();
            assert!(
                head.contains("failure_persistence")
                    && head.contains("FileFailurePersistence::Direct")
                    && head.contains("/target/"),
                "{}: a proptest! block without failure_persistence under target/ writes \
                 *.proptest-regressions into the source tree:\n{head}",
                rel(&p)
            );
        }
    }
    assert!(blocks >= 2, "found only {blocks} proptest! blocks");
}

#[test]
fn fixtures_match_their_readme() {
    let dir = root().join("tests/fixtures");
    let readme = text(&dir.join("README.md")).expect("tests/fixtures/README.md");
    let mut checked = 0;
    for line in readme.lines() {
        let mut parts = line.split_whitespace();
        let (Some(hash), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let bytes = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let got: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(got, hash, "tests/fixtures/{name} differs from its README");
        checked += 1;
    }
    assert_eq!(
        checked, 3,
        "the README lists the sha256 of the three fixtures"
    );
}

/// Relative link targets (`](path)` and `](path#anchor)`) of a markdown text.
fn relative_links(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = md;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        let Some(end) = rest.find(')') else { break };
        let target = &rest[..end];
        let path = target.split('#').next().unwrap();
        if !path.is_empty() && !path.contains("://") && !path.starts_with("mailto:") {
            out.push(path.to_string());
        }
    }
    out
}

#[test]
fn readme_and_docs_links_resolve() {
    assert_eq!(
        relative_links("see [a](docs/a.md#x), [b](https://x.org/y) and [c](#here)"),
        ["docs/a.md"]
    );
    let mut docs: Vec<PathBuf> = vec![root().join("README.md")];
    docs.extend(tree_files().into_iter().filter(|p| {
        p.extension().is_some_and(|e| e == "md")
            && (p.starts_with(root().join("docs")) || p.starts_with(root().join("tests")))
    }));
    let mut links = 0;
    for doc in &docs {
        let md = text(doc).unwrap();
        for link in relative_links(&md) {
            let target = doc.parent().unwrap().join(&link);
            assert!(
                target.exists(),
                "{}: the link {link} points nowhere",
                rel(doc)
            );
            links += 1;
        }
    }
    assert!(links >= 20, "only {links} relative links found");
}

#[test]
fn readme_is_short_and_ci_runs_its_test_command() {
    let readme = text(&root().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(
        lines <= 200,
        "README.md has {lines} lines; long material goes to docs/"
    );
    let quick = readme
        .split("## Quick start")
        .nth(1)
        .and_then(|s| s.split("```sh").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("a ```sh block under ## Quick start");
    let test_cmd = quick.lines().map(str::trim).next_back().unwrap();
    assert_eq!(test_cmd, "scripts/test", "the quick start's second command");
    let ci = text(&root().join(".ci/run")).unwrap();
    let last = ci
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap();
    assert_eq!(
        last, test_cmd,
        ".ci/run must end by running the README's test command"
    );
    assert!(
        !ci.contains("pip install"),
        ".ci/run installs nothing globally with pip: scripts/test owns its venv"
    );
}
