//! The README as a newcomer follows it, and the docs it leads to.
//!
//! - Every command of the README's ```sh, ```bash and ```console blocks that needs no cluster
//!   runs as written, in order, on a copy of the checkout (its tracked and untracked files, as
//!   a fresh clone plus the work in progress); a ```console block's output, when shown, is
//!   what the command prints. The other commands are skipped by a rule of [`SKIP_RULES`],
//!   each named; a command no rule knows fails the test, so a new one is classified.
//! - Every relative link of the README and of docs/ leads to a file, and every `#anchor` to a
//!   heading of its Markdown file.
//! - docs/configuration.md names every flag and variable each role's `--help` lists.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::tools;

/// `cargo run [-q] [--release] --` in a README command is the binary cargo builds; the test
/// runs the one `cargo test` built instead (the same code, another profile), so a test run
/// never waits for a second build.
const CARGO_RUN: &str = "cargo run";

/// Commands the README shows that this test does not run, and why. Each rule is a prefix of
/// a command, or of any stage of its pipeline for `kubectl`.
const SKIP_RULES: [(&str, &str); 4] = [
    ("./scripts/demo", "the README's first command: tests/it/demo.rs runs the same path"),
    ("./scripts/test", "the README's second command: CI runs it (.ci/run), and it runs this test"),
    ("docker ", "needs a container engine and a registry"),
    ("kubectl ", "needs a cluster (`kubectl kustomize` alone runs here)"),
];

/// The fewest commands the README must have run here, so that the test cannot pass by
/// skipping everything: the two `--help`s, `recommend`, `simulate`, `scaledobject` and
/// `kubectl kustomize` (the last only where kubectl is installed).
const FEWEST_RUN: usize = 5;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A fenced code block: its info string, its body (the fence's indentation taken off every
/// line) and the line its body starts on.
#[derive(Debug)]
struct Block {
    lang: String,
    body: String,
    line: usize,
}

/// The fenced code blocks of `markdown`, in order (indented fences too: a list item's).
fn blocks(markdown: &str) -> Vec<Block> {
    let mut found = Vec::new();
    let mut open: Option<(usize, Block)> = None;
    for (n, line) in markdown.lines().enumerate() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim_start();
        match &mut open {
            None if trimmed.starts_with("```") => {
                let lang = trimmed.trim_start_matches('`').trim().to_owned();
                open = Some((indent, Block { lang, body: String::new(), line: n + 2 }));
            }
            None => {}
            Some(_) if trimmed == "```" => found.push(open.take().unwrap().1),
            Some((indent, block)) => {
                block.body.push_str(line.get(*indent..).unwrap_or(trimmed));
                block.body.push('\n');
            }
        }
    }
    assert!(open.is_none(), "a code block is not closed");
    found
}

/// One command as the README shows it, with the output it shows, if any.
#[derive(Debug)]
struct Shown {
    command: String,
    output: Option<String>,
    line: usize,
}

/// The commands of a shell block: every line that is not blank or a comment, lines ending in
/// `\` joined to the next. In a ```console block, commands are the `$ ` lines and what
/// follows each, up to the next, is its output.
fn commands(block: &Block) -> Vec<Shown> {
    let console = block.lang == "console";
    let mut shown: Vec<Shown> = Vec::new();
    let mut continued = false;
    for (n, line) in block.body.lines().enumerate() {
        let line_no = block.line + n;
        if continued {
            let last = shown.last_mut().unwrap();
            last.command.push('\n');
            last.command.push_str(line);
            continued = line.ends_with('\\');
            continue;
        }
        let command = if console { line.strip_prefix("$ ") } else { Some(line) };
        match command {
            Some(c) if c.trim().is_empty() || c.trim_start().starts_with('#') => {}
            Some(c) => {
                shown.push(Shown { command: c.to_owned(), output: None, line: line_no });
                continued = c.ends_with('\\');
            }
            None => {
                let last =
                    shown.last_mut().unwrap_or_else(|| panic!("line {line_no}: output before any `$ `"));
                let output = last.output.get_or_insert_with(String::new);
                output.push_str(line);
                output.push('\n');
            }
        }
    }
    shown
}

/// Why a command is not run here, or `None` when it is.
fn skipped(command: &str) -> Option<&'static str> {
    let stages: Vec<&str> = command.split('|').map(str::trim).collect();
    SKIP_RULES.iter().find_map(|(prefix, why)| {
        let hit = if *prefix == "kubectl " {
            stages.iter().any(|s| s.starts_with(prefix) && !s.starts_with("kubectl kustomize "))
        } else {
            command.starts_with(prefix)
        };
        hit.then_some(*why)
    })
}

/// `command` with each `cargo run [-q] [--release] --` made the built binary
/// (`"$DURABLE_SCALER"`); any other cargo command is a command no rule knows.
fn with_built_binary(command: &str) -> String {
    let mut out = String::new();
    let mut rest = command;
    while let Some(at) = rest.find("cargo ") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let (head, tail) = after
            .split_once(" -- ")
            .filter(|(head, _)| head.starts_with(CARGO_RUN))
            .unwrap_or_else(|| panic!("`{command}`: only `cargo run ... --` is known"));
        let flags: Vec<&str> = head[CARGO_RUN.len()..].split_whitespace().collect();
        assert!(
            flags.iter().all(|f| matches!(*f, "-q" | "--quiet" | "--release")),
            "`{command}`: `cargo run` with {flags:?} is not the durable-scaler binary"
        );
        out.push_str("\"$DURABLE_SCALER\" ");
        rest = tail;
    }
    out.push_str(rest);
    out
}

/// Copies what a fresh clone holds (tracked files, and untracked ones git does not ignore)
/// into `dir`.
fn copy_checkout(dir: &Path) {
    let listed = Command::new("git")
        .args(["ls-files", "-z", "--cached", "--others", "--exclude-standard"])
        .current_dir(repo())
        .output()
        .expect("git runs");
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    for path in listed.stdout.split(|b| *b == 0).filter(|p| !p.is_empty()) {
        let path = Path::new(std::str::from_utf8(path).unwrap());
        let from = repo().join(path);
        if !from.is_file() {
            continue; // deleted in the work tree
        }
        let to = dir.join(path);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&from, &to).unwrap();
    }
}

/// A ```yaml block whose first line is a comment naming a path (`# ../my-install/x.yaml`) is
/// a file the reader is told to write: its path.
fn file_to_write(block: &Block) -> Option<&str> {
    let first = block.body.lines().next()?.strip_prefix("# ")?;
    let path = first.split([' ', ':']).next()?;
    (block.lang == "yaml" && path.ends_with(".yaml")).then_some(path)
}

#[test]
fn every_readme_command_that_needs_no_cluster_runs_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let kubectl = tools::available("kubectl", &["version", "--client"], "scripts/test asks for it by name");
    // The copy is named as a clone is, since the README's overlay names `../durable-scaler`.
    let parent = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let checkout = parent.path().join("durable-scaler");
    copy_checkout(&checkout);

    let (mut ran, mut skips, mut failures) = (Vec::new(), Vec::new(), Vec::new());
    for block in blocks(&readme) {
        if let Some(path) = file_to_write(&block) {
            let path = checkout.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, &block.body).unwrap();
            continue;
        }
        if !matches!(block.lang.as_str(), "sh" | "bash" | "console") {
            continue;
        }
        for shown in commands(&block) {
            let at = format!("README.md:{} `{}`", shown.line, shown.command);
            if let Some(why) = skipped(&shown.command) {
                skips.push(format!("{at}: {why}"));
                continue;
            }
            if shown.command.starts_with("kubectl kustomize") && !kubectl {
                continue;
            }
            let script = with_built_binary(&shown.command);
            let output = Command::new("timeout")
                .args(["120", "bash", "-euo", "pipefail", "-c", &script])
                .env("DURABLE_SCALER", env!("CARGO_BIN_EXE_durable-scaler"))
                .current_dir(&checkout)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&output.stdout);
            if !output.status.success() {
                failures.push(format!(
                    "{at}: {}\n{}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr)
                ));
            } else if let Some(expected) = &shown.output
                && stdout.trim() != expected.trim()
            {
                failures.push(format!("{at} printed\n{stdout}\nthe README shows\n{expected}"));
            }
            ran.push(at);
        }
    }
    eprintln!("ran:\n  {}\nskipped:\n  {}", ran.join("\n  "), skips.join("\n  "));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(ran.len() >= FEWEST_RUN - usize::from(!kubectl), "ran only {ran:?}");
    assert!(
        skips.iter().any(|s| s.contains("./scripts/demo"))
            && skips.iter().any(|s| s.contains("./scripts/test"))
    );
}

#[test]
fn the_readme_opens_with_the_two_commands() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let first = &blocks(&readme)[0];
    let commands: Vec<String> = commands(first).into_iter().map(|c| c.command).collect();
    assert!(readme.starts_with("# durable-scaler\n\n```sh\n"), "{}", &readme[..80]);
    assert!(commands[0].starts_with("./scripts/demo "), "{commands:?}");
    assert!(commands[1].starts_with("./scripts/test "), "{commands:?}");
    assert_eq!(commands.len(), 2);
}

/// GitHub's anchor for a heading: lowercased, every character but letters, digits, `-`, `_`
/// and spaces dropped, spaces made `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown file's headings (outside code blocks), repeated ones numbered
/// as GitHub numbers them.
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for line in outside_fences(markdown) {
        let Some(heading) = line.strip_prefix('#').map(|h| h.trim_start_matches('#')) else { continue };
        if !heading.starts_with(' ') {
            continue;
        }
        let base = anchor(heading);
        let mut candidate = base.clone();
        let mut n = 0;
        while !seen.insert(candidate.clone()) {
            n += 1;
            candidate = format!("{base}-{n}");
        }
    }
    seen
}

/// The lines of `markdown` outside fenced code blocks.
fn outside_fences(markdown: &str) -> Vec<&str> {
    let mut fenced = false;
    let mut lines = Vec::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            lines.push(line);
        }
    }
    lines
}

/// The targets of the inline links and images of `markdown`: `[text](target)`.
fn link_targets(markdown: &str) -> Vec<String> {
    let mut targets = Vec::new();
    for line in outside_fences(markdown) {
        // Inline code is not a link: `[x](y)` in backticks stays text.
        let line: String = line.split('`').step_by(2).collect();
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after.find(')').unwrap_or(after.len());
            targets.push(after[..end].to_owned());
            rest = &after[end..];
        }
    }
    targets
}

fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![repo().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

#[test]
fn every_relative_link_of_the_readme_and_the_docs_leads_to_a_file_and_a_heading() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.strip_prefix(repo()).unwrap().display().to_string();
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, fragment) = target.split_once('#').unwrap_or((&target, ""));
            let linked = if path.is_empty() { file.clone() } else { file.parent().unwrap().join(path) };
            if !linked.exists() {
                broken.push(format!("{name}: {target}: no such file"));
                continue;
            }
            if fragment.is_empty() {
                continue;
            }
            if linked.extension().is_none_or(|e| e != "md") {
                broken.push(format!("{name}: {target}: an anchor into a file that is not Markdown"));
                continue;
            }
            if !anchors(&std::fs::read_to_string(&linked).unwrap()).contains(fragment) {
                broken.push(format!("{name}: {target}: no such heading"));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
    assert!(checked > 100, "only {checked} links checked");
}

#[test]
fn anchors_are_made_as_github_makes_them() {
    assert_eq!(anchor("Kubernetes 1.28 and 1.29"), "kubernetes-128-and-129");
    assert_eq!(
        anchor("`recommend`: what would it decide, and why"),
        "recommend-what-would-it-decide-and-why"
    );
    assert_eq!(anchor("4. Pod deletion cost (KEP-2255)"), "4-pod-deletion-cost-kep-2255");
    assert_eq!(anchors("# A\n## A\n```\n# A\n```\n"), BTreeSet::from(["a".to_owned(), "a-1".to_owned()]));
}

/// The flags (`--name`) and environment variables (`[env: NAME=`) a `--help` lists.
fn flags_and_variables(help: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in help.lines() {
        let line = line.trim_start();
        let flag = line.strip_prefix("-h, ").or(line.strip_prefix("-n, ")).unwrap_or(line);
        if let Some(flag) = flag.strip_prefix("--") {
            let name: String = flag.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
            if !matches!(name.as_str(), "help" | "version") {
                names.insert(format!("--{name}"));
            }
        }
        let mut rest = line;
        while let Some(at) = rest.find("[env: ") {
            let after = &rest[at + 6..];
            let end = after.find(['=', ']']).unwrap();
            names.insert(after[..end].to_owned());
            rest = &after[end..];
        }
    }
    names
}

/// Whether `name` stands in `text` as itself, not as the start of a longer name.
fn names(text: &str, name: &str) -> bool {
    text.match_indices(name).any(|(at, _)| {
        let next = text[at + name.len()..].chars().next();
        !next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

#[test]
fn the_configuration_reference_names_every_flag_and_variable_of_every_role() {
    let reference = std::fs::read_to_string(repo().join("docs/configuration.md")).unwrap();
    for role in ["aggregator", "sidecar", "webhook"] {
        let help =
            Command::new(env!("CARGO_BIN_EXE_durable-scaler")).args([role, "--help"]).output().unwrap();
        assert!(help.status.success());
        let listed = flags_and_variables(&String::from_utf8_lossy(&help.stdout));
        assert!(listed.len() > 10, "{role}: {listed:?}");
        let missing: Vec<&String> = listed.iter().filter(|n| !names(&reference, n)).collect();
        assert!(missing.is_empty(), "docs/configuration.md does not name {role}'s {missing:?}");
    }
}
