//! `docs/cli.md` is the real `kuberaya --help` of every command and subcommand, rendered
//! here from the built binary; the test fails when the page and the CLI drift apart.
//! `UPDATE_DOCS=1 cargo test --test cli_doc` rewrites it.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use kuberaya_e2e::binary;

const DOC: &str = "docs/cli.md";

/// `kuberaya <path...> --help`, in a clean environment (no `KUBERAYA_*` values shown as
/// `[env: ...=value]`, no colours, no terminal width).
fn help(path: &[String]) -> Result<String> {
    let out = Command::new(binary("kuberaya"))
        .args(path)
        .arg("--help")
        .env_clear()
        .output()
        .context("running kuberaya --help")?;
    ensure!(out.status.success(), "kuberaya {path:?} --help: {out:?}");
    Ok(String::from_utf8(out.stdout)?)
}

/// The subcommands a help text lists (`Commands:` section), without `help`.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim_end() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        // A command line is indented by two spaces; wrapped descriptions by more.
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .map(|c| c.trim_end_matches(',').to_string())
        .filter(|c| c != "help")
        .collect()
}

fn render() -> Result<String> {
    let mut out = String::from(
        "<!-- Generated from `kuberaya --help` by `UPDATE_DOCS=1 cargo test --test cli_doc`. Do not edit. -->\n\n\
         # CLI reference: `kuberaya`\n\n\
         Every command's `--help`, as the binary prints it. Global flags (`--kubeconfig`, `--context`,\n\
         `-n/--namespace`, `-A/--all-namespaces`, `-v`) work on every command. Shell completion:\n\
         `kuberaya completion bash|zsh|fish`.\n\n",
    );
    let mut sections = Vec::new();
    let mut stack: Vec<Vec<String>> = vec![vec![]];
    while let Some(path) = stack.pop() {
        let text = help(&path)?;
        let subs = subcommands(&text);
        // Depth-first, in the order the help lists them.
        for s in subs.iter().rev() {
            let mut p = path.clone();
            p.push(s.clone());
            stack.push(p);
        }
        sections.push((path, text));
    }
    out.push_str("## Commands\n\n");
    for (path, _) in &sections {
        let name = std::iter::once("kuberaya".to_string())
            .chain(path.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        let anchor = name.replace(' ', "-");
        let indent = "  ".repeat(path.len().saturating_sub(1));
        out.push_str(&format!("{indent}- [`{name}`](#{anchor})\n"));
    }
    for (path, text) in &sections {
        let name = std::iter::once("kuberaya".to_string())
            .chain(path.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        out.push_str(&format!("\n## {name}\n\n```text\n{}\n```\n", text.trim_end()));
    }
    Ok(out)
}

#[test]
fn cli_doc_is_current() -> Result<()> {
    let rendered = render()?;
    assert!(
        rendered.contains("## kuberaya peer add"),
        "the walk reaches subcommands"
    );
    assert!(
        rendered.contains("## kuberaya sandbox up"),
        "the walk reaches subcommands"
    );
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(DOC);
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &rendered)?;
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == rendered,
        "{DOC} is out of date with `kuberaya --help`; run UPDATE_DOCS=1 cargo test --test cli_doc"
    );
    Ok(())
}
