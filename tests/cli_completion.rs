//! `kuberaya completion bash` as a shell uses it: the script is sourced by plain bash
//! (no bash-completion package needed), its completion function is found the way bash
//! finds it (`complete -p kuberaya`), and called the way bash calls it on Tab, with
//! `COMP_WORDS`, `COMP_CWORD`, `COMP_LINE` and `COMP_POINT` set for a half-typed command
//! line. `COMPREPLY` holds the subcommands that fit.

use std::process::Command;

use anyhow::{Result, ensure};
use kuberaya_e2e::binary;
use kuberaya_e2e::sandbox::output_text;

/// Sources the completion script and completes `$LINE` (the cursor at its end); prints
/// one candidate a line. A line ending in a space completes a new, empty word.
const COMPLETE: &str = r#"
set -euo pipefail
source <("$KUBERAYA" completion bash)
spec=$(complete -p kuberaya)
[[ $spec =~ -F\ ([^ ]+) ]] || { echo "no completion function in: $spec" >&2; exit 3; }
fn=${BASH_REMATCH[1]}
read -ra COMP_WORDS <<<"$LINE"
if [[ $LINE == *" " ]]; then COMP_WORDS+=(""); fi
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMP_LINE=$LINE
COMP_POINT=${#LINE}
COMPREPLY=()
"$fn" kuberaya "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"#;

/// What bash would offer for `line`.
fn complete(line: &str) -> Result<Vec<String>> {
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", COMPLETE])
        .env("KUBERAYA", binary("kuberaya"))
        .env("LINE", line)
        .output()?;
    ensure!(out.status.success(), "completing {line:?}: {}", output_text(&out));
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

#[test]
fn bash_completes_subcommands() -> Result<()> {
    let top = complete("kuberaya pe")?;
    ensure!(top == ["peer"], "kuberaya pe<Tab>: {top:?}");

    let all = complete("kuberaya ")?;
    for want in ["sandbox", "peer", "lb", "expose", "completion"] {
        ensure!(all.iter().any(|c| c == want), "kuberaya <Tab> offers {want}: {all:?}");
    }

    let peer = complete("kuberaya peer a")?;
    ensure!(peer == ["add"], "kuberaya peer a<Tab>: {peer:?}");

    let psk = complete("kuberaya peer psk ")?;
    ensure!(psk.iter().any(|c| c == "rotate"), "kuberaya peer psk <Tab>: {psk:?}");

    let lb = complete("kuberaya lb ")?;
    for want in ["list", "describe", "orphans"] {
        ensure!(lb.iter().any(|c| c == want), "kuberaya lb <Tab> offers {want}: {lb:?}");
    }

    let shells = complete("kuberaya completion ")?;
    ensure!(
        shells.iter().any(|c| c == "bash"),
        "kuberaya completion <Tab>: {shells:?}"
    );
    Ok(())
}
