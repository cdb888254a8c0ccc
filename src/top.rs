//! `duvo-bridge top --admin URL`: a live terminal view of a running bridge,
//! like `vector top`, read from its `/metrics` once a second.
//!
//! Rates are differences between two scrapes divided by the time between
//! them, so they move as soon as the second scrape lands and need nothing
//! from the bridge beyond the metrics it already exports (no token: the
//! metrics are open). Sized for an 80x24 terminal over ssh: four blocks of
//! plain text, rows cut to the width; `q` (or Esc, Ctrl-C) quits.
//! `--once` prints one view (two scrapes a second apart) as text instead,
//! for scripts and terminals that cannot take a full-screen program.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph};

/// Labels of one sample, sorted.
type Labels = BTreeMap<String, String>;

/// One scrape: every sample by metric name.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub at: Option<Instant>,
    series: BTreeMap<String, Vec<(Labels, f64)>>,
}

impl Scrape {
    /// Parse the Prometheus text format (comments skipped; a line that does
    /// not parse is skipped too: a view is best effort).
    pub fn parse(text: &str) -> Scrape {
        let mut s = Scrape::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((head, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match head.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}'))),
                None => (head, Labels::new()),
            };
            s.series
                .entry(name.to_string())
                .or_default()
                .push((labels, value));
        }
        s
    }

    /// Sum of `name`'s samples whose labels include every `(key, value)`.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.series.get(name).map_or(0.0, |v| {
            v.iter()
                .filter(|(l, _)| {
                    filter
                        .iter()
                        .all(|(k, want)| l.get(*k).is_some_and(|v| v == want))
                })
                .map(|(_, x)| x)
                .sum()
        })
    }

    /// The values label `key` takes on `name`.
    pub fn label_values(&self, name: &str, key: &str) -> BTreeSet<String> {
        self.series.get(name).map_or_else(BTreeSet::new, |v| {
            v.iter().filter_map(|(l, _)| l.get(key).cloned()).collect()
        })
    }

    fn has(&self, name: &str) -> bool {
        self.series.contains_key(name)
    }
}

fn parse_labels(s: &str) -> Labels {
    let mut out = Labels::new();
    let mut rest = s;
    while let Some((k, after)) = rest.split_once("=\"") {
        // Values are escaped: `\"` and `\\` inside.
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(k.trim_start_matches(',').trim().to_string(), value);
        rest = &after[end..];
    }
    out
}

/// What the view shows, from two scrapes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    pub ready: bool,
    /// Per source: (received/s, stored/s, duplicates/s, rejected/s).
    pub sources: Vec<(String, [f64; 4])>,
    /// Per queue: cases created/s.
    pub queues: Vec<(String, f64)>,
    pub backlog: f64,
    pub batched: f64,
    pub oldest_age_s: f64,
    /// API requests per minute, creates and the rest.
    pub create_rpm: f64,
    pub other_rpm: f64,
    /// The rate gate's pace, requests per minute.
    pub budget_rpm: f64,
    /// 429s per minute.
    pub limited_rpm: f64,
    pub tracked_open: f64,
    pub tracked_watching: f64,
    /// Failures reported per minute.
    pub failures_per_min: f64,
    pub reports_pending: f64,
    pub reports_sent_per_min: f64,
    pub reports_given_up: f64,
    pub dead_letters: f64,
}

impl View {
    pub fn from_scrapes(prev: &Scrape, cur: &Scrape) -> View {
        let secs = match (prev.at, cur.at) {
            (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
            _ => 1.0,
        };
        let rate = |name: &str, f: &[(&str, &str)]| {
            ((cur.sum(name, f) - prev.sum(name, f)) / secs).max(0.0)
        };
        let mut sources: BTreeSet<String> = BTreeSet::new();
        for m in [
            "duvo_bridge_events_received_total",
            "duvo_bridge_events_stored_total",
        ] {
            sources.extend(cur.label_values(m, "source"));
        }
        let sources = sources
            .into_iter()
            .map(|s| {
                let f = [("source", s.as_str())];
                let r = [
                    rate("duvo_bridge_events_received_total", &f),
                    rate("duvo_bridge_events_stored_total", &f),
                    rate("duvo_bridge_events_duplicate_total", &f),
                    rate("duvo_bridge_events_rejected_total", &f),
                ];
                (s, r)
            })
            .collect();
        let queues = cur
            .label_values("duvo_bridge_cases_created_total", "queue")
            .into_iter()
            .map(|q| {
                let r = rate("duvo_bridge_cases_created_total", &[("queue", q.as_str())]);
                (q, r)
            })
            .collect();
        let all_rpm = rate("duvo_bridge_api_requests_total", &[]) * 60.0;
        let create_rpm = rate(
            "duvo_bridge_api_requests_total",
            &[("endpoint", "create_cases")],
        ) * 60.0;
        View {
            ready: cur.sum("duvo_bridge_ready", &[]) >= 1.0,
            sources,
            queues,
            backlog: cur.sum("duvo_bridge_outbox_depth", &[]),
            batched: cur.sum("duvo_bridge_outbox_batched_events", &[]),
            oldest_age_s: cur.sum("duvo_bridge_outbox_oldest_event_age_seconds", &[]),
            create_rpm,
            other_rpm: (all_rpm - create_rpm).max(0.0),
            budget_rpm: cur.sum("duvo_bridge_rate_gate_effective_rpm", &[]),
            limited_rpm: rate("duvo_bridge_api_rate_limited_total", &[]) * 60.0,
            tracked_open: cur.sum("duvo_bridge_tracked_cases", &[("phase", "open")]),
            tracked_watching: cur.sum("duvo_bridge_tracked_cases", &[("phase", "watching")]),
            failures_per_min: rate("duvo_bridge_reports_created_total", &[("status", "failed")])
                * 60.0,
            reports_pending: cur.sum("duvo_bridge_reports_pending", &[]),
            reports_sent_per_min: rate("duvo_bridge_reports_sent_total", &[]) * 60.0,
            reports_given_up: cur.sum("duvo_bridge_reports_given_up_total", &[]),
            dead_letters: cur.sum("duvo_bridge_dead_letters_total", &[]),
        }
    }

    /// The view as titled blocks of text lines (the TUI draws each in a
    /// bordered block; `--once` prints them).
    pub fn blocks(&self) -> Vec<(String, Vec<String>)> {
        let mut intake = vec![format!(
            "{:<22}{:>12}{:>12}{:>12}{:>12}",
            "source", "received/s", "stored/s", "dupes/s", "refused/s"
        )];
        if self.sources.is_empty() {
            intake.push("(no events yet)".into());
        }
        for (s, r) in &self.sources {
            intake.push(format!(
                "{:<22}{:>12.1}{:>12.1}{:>12.1}{:>12.1}",
                cut(s, 21),
                r[0],
                r[1],
                r[2],
                r[3]
            ));
        }
        let mut delivery = vec![format!(
            "backlog {:<10} in batches {:<8} oldest {}",
            count(self.backlog),
            count(self.batched),
            age(self.oldest_age_s)
        )];
        if self.queues.is_empty() {
            delivery.push("(no case created yet)".into());
        }
        for (q, r) in &self.queues {
            delivery.push(format!("queue {:<38} {:>10.1} cases/s", cut(q, 38), r));
        }
        let used = if self.budget_rpm > 0.0 {
            100.0 * (self.create_rpm + self.other_rpm) / self.budget_rpm
        } else {
            0.0
        };
        let budget = vec![format!(
            "{:.0} creates + {:.0} other / {:.0} per min ({used:.0}% used)   429s {:.0}/min",
            self.create_rpm, self.other_rpm, self.budget_rpm, self.limited_rpm
        )];
        let tracking = vec![
            format!(
                "cases open {:<9} watching {:<9} failures reported {:.0}/min",
                count(self.tracked_open),
                count(self.tracked_watching),
                self.failures_per_min
            ),
            format!(
                "reports pending {:<6} sent {:.0}/min   given up {:<6} dead letters {}",
                count(self.reports_pending),
                self.reports_sent_per_min,
                count(self.reports_given_up),
                count(self.dead_letters)
            ),
        ];
        vec![
            ("Intake".into(), intake),
            ("Delivery".into(), delivery),
            ("API budget".into(), budget),
            ("Tracking and reports".into(), tracking),
        ]
    }
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

fn count(x: f64) -> String {
    format!("{}", x.max(0.0).round() as u64)
}

fn age(s: f64) -> String {
    match s {
        s if s >= 3600.0 => format!("{:.1} h", s / 3600.0),
        s if s >= 60.0 => format!("{:.1} min", s / 60.0),
        s => format!("{s:.1} s"),
    }
}

async fn scrape(client: &reqwest::Client, url: &str) -> anyhow::Result<Scrape> {
    let text = client
        .get(url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("scraping {url}"))?
        .text()
        .await?;
    let mut s = Scrape::parse(&text);
    if !s.has("duvo_bridge_build_info") && !s.has("duvo_bridge_ready") {
        bail!("{url} does not look like a duvo-bridge admin listener");
    }
    s.at = Some(Instant::now());
    Ok(s)
}

/// Run `top`: until `q`, or once with `once`. The exit status.
pub async fn run(admin: &str, every: Duration, once: bool) -> anyhow::Result<i32> {
    let url = format!("{}/metrics", admin.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let mut prev = scrape(&client, &url).await?;
    if once {
        tokio::time::sleep(every).await;
        let cur = scrape(&client, &url).await?;
        let v = View::from_scrapes(&prev, &cur);
        println!(
            "duvo-bridge {}  {}",
            admin,
            if v.ready { "ready" } else { "NOT READY" }
        );
        for (title, lines) in v.blocks() {
            println!("[{title}]");
            for l in lines {
                println!("  {l}");
            }
        }
        return Ok(0);
    }
    let mut terminal = ratatui::init();
    let result = async {
        let mut view = View::from_scrapes(&prev, &prev);
        let mut status = String::from("first scrape; rates appear after the next");
        let mut next = Instant::now() + every;
        loop {
            terminal.draw(|f| draw(f, admin, &view, &status, every))?;
            // Keys are polled in slices so a scrape is never late by more
            // than one slice.
            let wait = next.saturating_duration_since(Instant::now());
            if event::poll(wait.min(Duration::from_millis(100)))?
                && let Event::Key(k) = event::read()?
                && k.kind == KeyEventKind::Press
                && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                    || (k.code == KeyCode::Char('c')
                        && k.modifiers.contains(KeyModifiers::CONTROL)))
            {
                return Ok::<_, anyhow::Error>(0);
            }
            if Instant::now() >= next {
                next = Instant::now() + every;
                match scrape(&client, &url).await {
                    Ok(cur) => {
                        view = View::from_scrapes(&prev, &cur);
                        status = format!("updated {}", chrono::Local::now().format("%H:%M:%S"));
                        prev = cur;
                    }
                    Err(e) => status = format!("{e:#}"),
                }
            }
        }
    }
    .await;
    ratatui::restore();
    result
}

fn draw(f: &mut ratatui::Frame, admin: &str, view: &View, status: &str, every: Duration) {
    let blocks = view.blocks();
    let mut constraints = vec![Constraint::Length(1)];
    constraints.extend(
        blocks
            .iter()
            .map(|(_, lines)| Constraint::Length(lines.len() as u16 + 2)),
    );
    constraints.push(Constraint::Min(0));
    constraints.push(Constraint::Length(1));
    let areas = Layout::vertical(constraints).split(f.area());
    let head = format!(
        "duvo-bridge top  {admin}  {}  every {}s",
        if view.ready { "ready" } else { "NOT READY" },
        every.as_secs_f64()
    );
    f.render_widget(
        Paragraph::new(Line::from(head)).style(Style::default().add_modifier(Modifier::BOLD)),
        areas[0],
    );
    for (i, (title, lines)) in blocks.into_iter().enumerate() {
        let text: Vec<Line> = lines.into_iter().map(Line::from).collect();
        f.render_widget(
            Paragraph::new(text).block(Block::bordered().title(format!(" {title} "))),
            areas[i + 1],
        );
    }
    let last = areas[areas.len() - 1];
    f.render_widget(
        Paragraph::new(Line::from(format!("q quits  {status}"))),
        last,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_two_scrapes() {
        let t0 = Instant::now();
        let mut a = Scrape::parse(
            "# HELP x\nduvo_bridge_events_stored_total{source=\"oms\"} 100\nduvo_bridge_cases_created_total{queue=\"q1\"} 50\nduvo_bridge_api_requests_total{endpoint=\"create_cases\",outcome=\"201\"} 10\nduvo_bridge_api_requests_total{endpoint=\"list_cases\",outcome=\"200\"} 1\nduvo_bridge_rate_gate_effective_rpm 300\nduvo_bridge_ready 1\nduvo_bridge_outbox_depth 7\n",
        );
        a.at = Some(t0);
        let mut b = Scrape::parse(
            "duvo_bridge_events_stored_total{source=\"oms\"} 300\nduvo_bridge_cases_created_total{queue=\"q1\"} 150\nduvo_bridge_api_requests_total{endpoint=\"create_cases\",outcome=\"201\"} 20\nduvo_bridge_api_requests_total{endpoint=\"list_cases\",outcome=\"200\"} 2\nduvo_bridge_rate_gate_effective_rpm 300\nduvo_bridge_ready 1\nduvo_bridge_outbox_depth 9\n",
        );
        b.at = Some(t0 + Duration::from_secs(2));
        let v = View::from_scrapes(&a, &b);
        assert!(v.ready);
        assert_eq!(v.sources, vec![("oms".into(), [0.0, 100.0, 0.0, 0.0])]);
        assert_eq!(v.queues, vec![("q1".into(), 50.0)]);
        assert_eq!(v.create_rpm, 300.0);
        assert_eq!(v.other_rpm, 30.0);
        assert_eq!(v.backlog, 9.0);
        let text: String = v
            .blocks()
            .iter()
            .flat_map(|(_, l)| l.clone())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(text.contains("110% used"), "{text}");
        for (_, lines) in v.blocks() {
            for l in lines {
                assert!(l.chars().count() <= 78, "fits 80 columns: {l:?}");
            }
        }
    }

    #[test]
    fn labels_with_escapes_parse() {
        let s = Scrape::parse(r#"m{a="x\"y",b="z"} 2"#);
        assert_eq!(s.sum("m", &[("a", "x\"y"), ("b", "z")]), 2.0);
    }
}
