//! Output of read commands (`-o table|wide|json|yaml`), colour, progress, and the small
//! human formats (ages, byte counts) the tables use. Everything here is pure except
//! [`Style::detect`] and [`Progress`].

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::ValueEnum;
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Table,
    Json,
}

/// `-o` of the read commands: tables for people, JSON and YAML for scripts (their shape is
/// stable: new fields may be added, none renamed or removed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    #[default]
    Table,
    /// The table with more columns.
    Wide,
    Json,
    Yaml,
}

/// The `-o/--output` flag of a read command.
#[derive(Debug, Clone, clap::Args)]
pub struct OutputArg {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Format,
}

/// Render `value` as `format`; `table(wide)` renders the table forms.
pub fn render<T: Serialize>(format: Format, value: &T, table: impl FnOnce(bool) -> String) -> anyhow::Result<String> {
    match format {
        Format::Table => Ok(table(false)),
        Format::Wide => Ok(table(true)),
        Format::Json => {
            let mut s = serde_json::to_string_pretty(value).context("encoding JSON")?;
            s.push('\n');
            Ok(s)
        }
        Format::Yaml => serde_saphyr::to_string(value).context("encoding YAML"),
    }
}

/// Colours for table cells. Only on a terminal, and never when `NO_COLOR` is set
/// (<https://no-color.org>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    pub color: bool,
}

/// The few colours we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Color {
    Green,
    Yellow,
    Red,
}

impl Style {
    /// Colour when stdout is a terminal and `NO_COLOR` is unset or empty.
    pub fn detect() -> Self {
        Style::decide(std::io::stdout().is_terminal(), std::env::var_os("NO_COLOR"))
    }

    /// The decision itself.
    pub fn decide(tty: bool, no_color: Option<std::ffi::OsString>) -> Self {
        Style {
            color: tty && no_color.is_none_or(|v| v.is_empty()),
        }
    }

    pub fn plain() -> Self {
        Style { color: false }
    }

    pub fn paint(&self, text: &str, color: Color) -> String {
        if !self.color {
            return text.to_string();
        }
        let code = match color {
            Color::Green => 32,
            Color::Yellow => 33,
            Color::Red => 31,
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }
}

/// The width of `s` on a terminal: characters, not counting ANSI colour sequences.
pub fn visible_len(s: &str) -> usize {
    let mut n = 0;
    let mut in_escape = false;
    for c in s.chars() {
        match (in_escape, c) {
            (false, '\x1b') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, _) => n += 1,
        }
    }
    n
}

/// A kubectl-style age: `45s`, `12m`, `3h`, `5d`; `-` when absent, `in 3d` for the future.
pub fn age(now: Timestamp, t: Option<Timestamp>) -> String {
    let Some(t) = t else { return "-".into() };
    let secs = now.as_second() - t.as_second();
    if secs < 0 {
        return format!("in {}", short_duration(secs.unsigned_abs()));
    }
    format!("{} ago", short_duration(secs.unsigned_abs()))
}

/// `45s`, `12m`, `3h`, `5d`.
pub fn short_duration(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// `512B`, `1.5KiB`, `3.0MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

/// Shown on stderr while something waits: a ticking line on a terminal, one line otherwise.
pub struct Progress {
    message: String,
    started: Instant,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    pub fn start(message: impl Into<String>) -> Self {
        let message = message.into();
        let started = Instant::now();
        let ticker = if std::io::stderr().is_terminal() {
            let m = message.clone();
            Some(tokio::spawn(async move {
                const FRAMES: [char; 4] = ['|', '/', '-', '\\'];
                let mut i = 0usize;
                loop {
                    eprint!("\r{} {} {}s ", FRAMES[i % 4], m, started.elapsed().as_secs());
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }))
        } else {
            eprintln!("{message} ...");
            None
        };
        Progress {
            message,
            started,
            ticker,
        }
    }

    /// Stop ticking and print how it ended.
    pub fn finish(mut self, outcome: &str) {
        if let Some(t) = self.ticker.take() {
            t.abort();
            eprintln!(
                "\r{} {outcome} ({}s)   ",
                self.message,
                self.started.elapsed().as_secs()
            );
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(t) = self.ticker.take() {
            t.abort();
            eprintln!();
        }
    }
}

/// Render rows as a kubectl-style table: upper-case headers, columns padded to the widest
/// cell and separated by three spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(visible_len(cell));
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths[i] - visible_len(cell) + 3;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
    };
    line(
        headers
            .iter()
            .map(|h| h.to_uppercase())
            .collect::<Vec<_>>()
            .iter()
            .map(|s| s.as_str())
            .collect(),
    );
    for row in rows {
        line(row.iter().map(|s| s.as_str()).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_pads_columns_to_the_widest_cell() {
        let t = table(
            &["name", "ip"],
            &[
                vec!["w1".into(), "127.10.0.11".into()],
                vec!["worker-22".into(), "-".into()],
            ],
        );
        assert_eq!(t, "NAME        IP\nw1          127.10.0.11\nworker-22   -\n");
    }

    #[test]
    fn colour_only_on_a_tty_without_no_color() {
        assert!(Style::decide(true, None).color);
        assert!(!Style::decide(false, None).color);
        assert!(!Style::decide(true, Some("1".into())).color);
        assert!(Style::decide(true, Some("".into())).color);
        let s = Style { color: true };
        let red = s.paint("Rejected", Color::Red);
        assert_eq!(visible_len(&red), 8);
        let t = table(&["state", "x"], &[vec![red, "1".into()]]);
        assert!(t.starts_with("STATE      X\n"), "{t:?}");
        assert_eq!(Style::plain().paint("x", Color::Green), "x");
    }

    #[test]
    fn human_formats() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        assert_eq!(age(now, None), "-");
        assert_eq!(
            age(now, Some(Timestamp::from_second(1_000_000 - 45).unwrap())),
            "45s ago"
        );
        assert_eq!(
            age(now, Some(Timestamp::from_second(1_000_000 - 600).unwrap())),
            "10m ago"
        );
        assert_eq!(
            age(now, Some(Timestamp::from_second(1_000_000 + 3 * 86400).unwrap())),
            "in 3d"
        );
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(1536), "1.5KiB");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0MiB");
    }

    #[test]
    fn json_and_yaml_render_the_value() {
        let v = serde_json::json!({"items": [{"name": "a"}]});
        let j = render(Format::Json, &v, |_| String::new()).unwrap();
        assert_eq!(serde_json::from_str::<serde_json::Value>(&j).unwrap(), v);
        let y = render(Format::Yaml, &v, |_| String::new()).unwrap();
        assert!(y.contains("name: a"), "{y}");
        assert_eq!(render(Format::Wide, &v, |w| w.to_string()).unwrap(), "true");
    }
}
