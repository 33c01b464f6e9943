//! The outputs: a table on stdout, `report.md`, `report.json` and a
//! hand-written SVG latency chart.

use std::fmt::Write as _;

use serde::Serialize;

use crate::common::{Machine, Settings, fmt_ratio, fmt_ratio_against, ratio};
use crate::heartbeat::HeartbeatRow;
use crate::latency::{LatencyRow, LatencyRun};
use crate::liveness::LivenessResult;
use crate::throughput::ThroughputRow;
use crate::timer::TimerResult;

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub target: String,
    pub measured: String,
    /// `None` when the figure is missing.
    pub met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyRunMeta {
    pub pinning: String,
    pub cpus_allowed: String,
    pub server_event_loops: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub settings: Option<Settings>,
    pub duration_s: f64,
    /// How each figure was measured.
    pub method: Vec<(String, String)>,
    pub latency_runs: Vec<LatencyRunMeta>,
    pub latency: Vec<LatencyRow>,
    pub throughput: Vec<ThroughputRow>,
    pub heartbeat: Vec<HeartbeatRow>,
    pub timer: Option<TimerResult>,
    pub liveness: Option<LivenessResult>,
    pub targets: Vec<Target>,
    /// Sections that failed to run, with why.
    pub errors: Vec<String>,
}

impl Report {
    pub fn add_latency(&mut self, run: LatencyRun) {
        self.latency_runs.push(LatencyRunMeta {
            pinning: run.pinning,
            cpus_allowed: run.cpus_allowed,
            server_event_loops: run.server_event_loops,
        });
        self.latency.extend(run.rows);
        let baseline = |name: &str| -> Vec<(String, usize, f64, f64, f64)> {
            self.latency
                .iter()
                .filter(|r| r.implementation == name && r.calls > 0)
                .map(|r| {
                    (
                        r.pinning.clone(),
                        r.payload,
                        r.latency.p50_us,
                        r.latency.p99_us,
                        r.latency.p999_us,
                    )
                })
                .collect()
        };
        let spin = baseline("raw-spin");
        let raw = baseline("raw");
        // The same pinning and payload in a baseline's rows.
        let find = |rows: &[(String, usize, f64, f64, f64)], row: &LatencyRow| {
            rows.iter()
                .find(|(p, s, ..)| *p == row.pinning && *s == row.payload)
                .map(|&(_, _, p50, p99, p999)| (p50, p99, p999))
        };
        for row in self
            .latency
            .iter_mut()
            .filter(|r| r.implementation != "raw")
        {
            if let Some((p50, p99, p999)) = find(&raw, row) {
                row.ratio_p50 = ratio(row.latency.p50_us, p50);
                row.ratio_p99 = ratio(row.latency.p99_us, p99);
                row.ratio_p999 = ratio(row.latency.p999_us, p999);
            }
            if !row.implementation.starts_with("pulse") {
                continue;
            }
            if let Some((p50, p99, p999)) = find(&spin, row) {
                row.ratio_spin_p50 = ratio(row.latency.p50_us, p50);
                row.ratio_spin_p99 = ratio(row.latency.p99_us, p99);
                row.ratio_spin_p999 = ratio(row.latency.p999_us, p999);
            }
        }
    }

    fn lat(&self, pinning: &str, implementation: &str, payload: usize) -> Option<&LatencyRow> {
        self.latency.iter().find(|r| {
            r.pinning == pinning
                && r.implementation == implementation
                && r.payload == payload
                && r.calls > 0
        })
    }

    fn tp(&self, key: &str, implementation: &str, connections: usize) -> Option<&ThroughputRow> {
        self.throughput.iter().find(|r| {
            r.key == key
                && r.implementation == implementation
                && (r.implementation == "raw" || r.connections == connections)
        })
    }

    /// The issue's targets, next to what this run measured.
    pub fn check_targets(&mut self) {
        let mut t = Vec::new();
        let mut ratio_target = |name: String, value: Option<f64>, limit: f64, at_most: bool| {
            t.push(Target {
                target: name,
                measured: fmt_ratio_against(value, limit),
                met: value.map(|v| if at_most { v <= limit } else { v >= limit }),
            });
        };
        let has = |pinning: &str| self.latency.iter().any(|r| r.pinning == pinning);
        let (has_unpinned, has_pinned) = (has("unpinned"), has("pinned-1core"));
        let has_tp = !self.throughput.is_empty();
        let mut ratio_target =
            |name: String, value: Option<f64>, limit: f64, at_most: bool, present: bool| {
                if present {
                    ratio_target(name, value, limit, at_most);
                }
            };
        for mode in ["pulse-pool", "pulse-inline"] {
            let un = self.lat("unpinned", mode, 32);
            ratio_target(
                format!("{mode}: sequential p50 ≤ 1.1 × raw, unpinned (32 B)"),
                un.and_then(|r| r.ratio_p50),
                1.1,
                true,
                has_unpinned,
            );
            ratio_target(
                format!("{mode}: sequential p99 ≤ 1.5 × raw, unpinned (32 B)"),
                un.and_then(|r| r.ratio_p99),
                1.5,
                true,
                has_unpinned,
            );
            let pin = self.lat("pinned-1core", mode, 32);
            ratio_target(
                format!("{mode}: sequential p50 ≤ 2 × raw, pinned to one core (32 B)"),
                pin.and_then(|r| r.ratio_p50),
                2.0,
                true,
                has_pinned,
            );
        }
        for mode in ["pulse-pool", "pulse-inline"] {
            for threads in [16, 64] {
                let r = self
                    .tp(&format!("seq-{threads}"), mode, 1)
                    .and_then(|r| r.ratio);
                ratio_target(
                    format!(
                        "{mode}: {threads} callers on one Client ≥ 1.0 × raw with {threads} connections"
                    ),
                    r,
                    1.0,
                    false,
                    has_tp,
                );
            }
        }
        for (key, how) in [
            ("pipelined", "64 outstanding, start"),
            ("pipelined-deferred", "64 outstanding, start_deferred"),
            (
                "pipelined-placed",
                "64 outstanding, start, loops placed with loop_cpus",
            ),
            (
                "pipelined-deferred-placed",
                "64 outstanding, start_deferred, loops placed with loop_cpus",
            ),
        ] {
            for mode in ["pulse-pool", "pulse-inline"]
                .into_iter()
                .filter(|_| has_tp)
            {
                let r = self.tp(key, mode, 1);
                t.push(Target {
                    target: format!(
                        "{mode}: pipelined from one thread ({how}) ≥ 1,000,000 calls/s"
                    ),
                    measured: r.map_or("–".into(), |r| {
                        format!(
                            "{:.0} calls/s (rounds: {})",
                            r.ops_per_s,
                            rounds_cell(&r.round_ops_per_s)
                        )
                    }),
                    met: r.map(|r| r.ops_per_s >= 1e6),
                });
            }
        }
        let heartbeat_row = |mode: &str| {
            self.heartbeat
                .iter()
                .find(|h| h.heartbeats == mode && h.error.is_none())
        };
        for (mode, label) in [
            ("on", "heartbeating at 1 s"),
            (
                "idle",
                "heartbeating at 1 s, provider in Idle mode (consumers ping)",
            ),
        ] {
            if let Some(row) = heartbeat_row(mode) {
                t.push(Target {
                    target: format!(
                        "{} idle connections open ({} requested) {label}: < 2 % of one core",
                        row.open_at_end, row.idle_conns
                    ),
                    measured: format!(
                        "{:.2} %{} (the consumers' bare mio loop: {:.2} % over its {:.1} s from READY to the stop)",
                        row.cpu_pct_one_core,
                        row.kernel_share_pct
                            .map_or(String::new(), |k| format!(", {k:.0} % of it in the kernel")),
                        row.consumers.cpu_pct,
                        row.consumers.window_s
                    ),
                    met: Some(row.cpu_pct_one_core < 2.0),
                });
            }
        }
        if let Some(on) = heartbeat_row("on") {
            t.push(Target {
                target: format!(
                    "{} idle connections open ({} requested): < 8 KiB of user-space memory (RSS) per connection",
                    on.open_at_end, on.idle_conns
                ),
                measured: format!("{:.0} B", on.rss_per_conn_bytes),
                met: Some(on.rss_per_conn_bytes < 8192.0),
            });
        }
        if let Some(l) = &self.liveness
            && l.detection_from_last_byte.trials > 0
        {
            // The bound counts from the last byte delivered, which is at or
            // before the freeze: that figure is the one checked.
            t.push(Target {
                target: format!(
                    "detection p99, from the last byte delivered, ≤ max_missed × interval + tick + 10 ms = {:.0} ms",
                    l.target_ms
                ),
                measured: format!(
                    "{:.1} ms from the last byte delivered ({:.1} ms from the freeze)",
                    l.detection_from_last_byte.p99_ms, l.detection_from_freeze.p99_ms
                ),
                met: Some(l.detection_from_last_byte.p99_ms <= l.target_ms),
            });
        }
        self.targets = t;
    }

    // ----- text ----------------------------------------------------------------

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(s, "# pulse benchmark report\n");
        let _ = writeln!(
            s,
            "- machine: {} × {}, {}\n- rustc: {}\n- pulse: {}\n- load average at start / end: {} / {}\n- mode: {}{}\n- duration: {:.0} s\n",
            m.cores,
            m.cpu_model,
            m.kernel,
            m.rustc,
            m.git,
            m.loadavg_start,
            m.loadavg_end,
            if self.settings.as_ref().is_some_and(|s| s.quick) {
                "QUICK (PULSE_BENCH_QUICK=1: counts ÷10, windows ÷3)"
            } else {
                "full"
            },
            self.settings
                .as_ref()
                .and_then(|s| s.only.as_ref())
                .map_or(String::new(), |o| format!(", only {}", o.join(","))),
            self.duration_s
        );
        if !self.errors.is_empty() {
            let _ = writeln!(s, "**Sections that failed:**\n");
            for e in &self.errors {
                let _ = writeln!(s, "- {e}");
            }
            s.push('\n');
        }
        if !self.targets.is_empty() {
            let _ = writeln!(s, "## Targets (goals from issue 4, not assertions)\n");
            let _ = writeln!(s, "| target | measured | met |\n|---|---|---|");
            for t in &self.targets {
                let met = match t.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "–",
                };
                let _ = writeln!(s, "| {} | {} | {met} |", t.target, t.measured);
            }
            s.push('\n');
        }
        if !self.latency.is_empty() {
            let _ = writeln!(s, "## Sequential call latency (one caller thread)\n");
            for meta in &self.latency_runs {
                let _ = writeln!(
                    s,
                    "- `{}`: CPUs allowed {}, provider event loops {}",
                    meta.pinning, meta.cpus_allowed, meta.server_event_loops
                );
            }
            let _ = writeln!(
                s,
                "\n| pinning | payload | impl | calls | p50 µs | p99 µs | p99.9 µs | max µs | p50/raw | p99/raw | p99.9/raw | p50/raw-spin | p99/raw-spin | p99.9/raw-spin | CPU µs/call | round p50s µs | errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
            );
            for r in &self.latency {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} |",
                    r.pinning,
                    size_label(r.payload),
                    r.implementation,
                    r.calls,
                    r.latency.p50_us,
                    r.latency.p99_us,
                    r.latency.p999_us,
                    r.latency.max_us,
                    fmt_ratio(r.ratio_p50),
                    fmt_ratio(r.ratio_p99),
                    fmt_ratio(r.ratio_p999),
                    fmt_ratio(r.ratio_spin_p50),
                    fmt_ratio(r.ratio_spin_p99),
                    fmt_ratio(r.ratio_spin_p999),
                    r.cpu_us_per_call,
                    r.round_p50_us
                        .iter()
                        .map(|v| format!("{v:.1}"))
                        .collect::<Vec<_>>()
                        .join(" / "),
                    errors_cell(r.errors, r.first_error.as_deref()),
                );
            }
            s.push('\n');
        }
        if !self.throughput.is_empty() {
            let _ = writeln!(s, "## Throughput (32 B payload)\n");
            let _ = writeln!(
                s,
                "| pattern | impl | threads | conns/Clients | calls/s (median of rounds) | rounds, in order | slices: low / median / high | vs raw | handled/s | CPU µs/call | errors |\n|---|---|---|---|---|---|---|---|---|---|---|"
            );
            for r in &self.throughput {
                let [low, mid, high] = r.slice_ops_per_s;
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {:.0} | {} | {low:.0} / {mid:.0} / {high:.0} | {} | {} | {:.1} | {} |",
                    r.pattern,
                    r.implementation,
                    r.threads,
                    r.connections,
                    r.ops_per_s,
                    rounds_cell(&r.round_ops_per_s),
                    r.baseline
                        .as_ref()
                        .map_or("–".into(), |b| format!("{} of {b}", fmt_ratio(r.ratio))),
                    handled_cell(r),
                    r.cpu_us_per_op,
                    tp_errors_cell(r),
                );
            }
            s.push('\n');
        }
        if !self.heartbeat.is_empty() {
            let _ = writeln!(
                s,
                "## Heartbeat cost (provider process, idle consumers in another process)\n"
            );
            let _ = writeln!(
                s,
                "| heartbeats | interval | conns open (start/end) | provider CPU % of one core | of which in the kernel | consumers' CPU % (bare mio loop, READY → stop) | RSS before → with conns (KiB) | RSS per conn | provider threads | consumer pings sent / pongs back / provider pings answered | error |\n|---|---|---|---|---|---|---|---|---|---|---|"
            );
            for h in &self.heartbeat {
                let _ = writeln!(
                    s,
                    "| {} | {} ms | {} / {} of {} | {:.2} % | {} | {:.2} % | {} → {} | {:.0} B | {} | {} / {} / {} | {} |",
                    h.heartbeats,
                    h.interval_ms,
                    h.open_at_start,
                    h.open_at_end,
                    h.idle_conns,
                    h.cpu_pct_one_core,
                    kernel_cell(h),
                    h.consumers.cpu_pct,
                    h.rss_before_kib,
                    h.rss_end_kib,
                    h.rss_per_conn_bytes,
                    h.provider_threads,
                    h.consumers.pings_sent,
                    h.consumers.pongs_received,
                    h.consumers.pings_answered,
                    h.error.as_deref().unwrap_or(""),
                );
            }
            if let [off, on, ..] = &self.heartbeat[..]
                && off.error.is_none()
                && on.error.is_none()
            {
                let _ = writeln!(
                    s,
                    "\nHeartbeats themselves cost {:.2} percentage points of one core for {} connections ({:.2} µs of CPU per connection per second).",
                    on.cpu_pct_one_core - off.cpu_pct_one_core,
                    on.idle_conns,
                    (on.cpu_pct_one_core - off.cpu_pct_one_core) / 100.0 * 1e6
                        / on.idle_conns.max(1) as f64,
                );
            }
            let _ = writeln!(
                s,
                "\nThe consumers' column is a floor: one `mio` thread with raw sockets and no \
                 liveness logic. In the idle row it moves the mirror image of the provider's \
                 traffic (it writes a Ping and reads a Pong per connection per second where the \
                 provider reads the Ping and writes the Pong), so what it costs is roughly the \
                 kernel's share of that traffic on this machine. In the on row it does more \
                 than the provider: per connection per second it writes its Ping, reads the Pong \
                 and the provider's Ping (sent together in one write) and writes a Pong, two \
                 writes where the provider makes one. The kernel column is the provider's \
                 system time over its user plus system time in the window (`/proc/self/stat`; \
                 the kernel splits run time by where its timer ticks found the threads, so it \
                 is shown only over 200 ms of CPU or more): what the system calls pulse makes \
                 (reads, writes, `epoll_wait`) and the wake-ups cost, against pulse's own code."
            );
            s.push('\n');
        }
        if let Some(t) = &self.timer {
            let _ = writeln!(
                s,
                "## Timer wheel (`pulse::timer::Wheel`, {} live timers)\n",
                t.live_timers
            );
            let _ = writeln!(s, "| measurement | value |\n|---|---|");
            let _ = writeln!(
                s,
                "| fill: insert into a growing wheel | {:.1} ns/timer |",
                t.fill_ns_per_insert
            );
            let _ = writeln!(
                s,
                "| cancel a random timer + schedule a new one ({} pairs) | {:.1} ns/pair |",
                t.pairs, t.schedule_cancel_ns_per_pair
            );
            let _ = writeln!(
                s,
                "| busy tick: every timer fires once per {} ticks and is re-armed ({} ticks, {:.0} fired/tick) | advance {:.1} µs/tick ({:.1} ns per fired timer); with re-arm {:.1} µs/tick |",
                crate::timer::PERIOD,
                t.busy_ticks,
                t.busy_fired_per_tick,
                t.busy_advance_ns_per_tick / 1000.0,
                t.busy_advance_ns_per_fired,
                t.busy_tick_with_rearm_ns / 1000.0
            );
            let _ = writeln!(
                s,
                "| empty tick (all timers far ahead, {} ticks) | {:.1} ns/tick |",
                t.empty_ticks, t.empty_advance_ns_per_tick
            );
            s.push('\n');
        }
        if let Some(l) = &self.liveness {
            let _ = writeln!(
                s,
                "## Liveness at {} ms × {} (timer tick {} ms; target {:.0} ms)\n",
                l.interval_ms, l.max_missed, l.timer_tick_ms, l.target_ms
            );
            let _ = writeln!(
                s,
                "| measurement | trials | min ms | p50 ms | p90 ms | p99 ms | max ms |\n|---|---|---|---|---|---|---|"
            );
            for (name, d) in [
                ("detection, from freeze", &l.detection_from_freeze),
                (
                    "detection, from last byte delivered",
                    &l.detection_from_last_byte,
                ),
                (
                    "reconnect, from the start of the new bind",
                    &l.reconnect_from_bind,
                ),
                (
                    "reconnect, whole outage (shutdown → connected)",
                    &l.reconnect_outage,
                ),
                (
                    "reconnect, due attempt → connected",
                    &l.reconnect_attempt_to_connected,
                ),
                ("provider graceful shutdown (drop)", &l.provider_shutdown),
            ] {
                let _ = writeln!(
                    s,
                    "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    d.trials, d.min_ms, d.p50_ms, d.p90_ms, d.p99_ms, d.max_ms
                );
            }
            if l.reconnect_attempt_excluded > 0 {
                let _ = writeln!(
                    s,
                    "\n*Due attempt → connected* leaves out {} trial(s) whose successful attempt was due before the bind started (or had no `Reconnecting` event).",
                    l.reconnect_attempt_excluded
                );
            }
            let _ = writeln!(
                s,
                "\nDisconnect reasons seen: {}.",
                l.detection_reasons.join(", ")
            );
            for e in l.detection_errors.iter().chain(&l.reconnect_errors) {
                let _ = writeln!(s, "- {e}");
            }
            s.push('\n');
        }
        if !self.method.is_empty() {
            let _ = writeln!(s, "## Method\n");
            for (k, v) in &self.method {
                let _ = writeln!(s, "- **{k}**: {v}");
            }
        }
        s
    }

    // ----- chart ---------------------------------------------------------------

    /// Grouped bars of p50 / p99 / p99.9 per payload, raw vs pulse, one panel
    /// per pinning, on a log scale.
    pub fn svg(&self) -> String {
        let impls = [
            ("raw", "#8c8c8c"),
            ("raw-spin", "#c9a227"),
            ("pulse-pool", "#3b6fd6"),
            ("pulse-inline", "#2aa36b"),
        ];
        let pcts = ["p50", "p99", "p99.9"];
        let pinnings: Vec<&str> = ["unpinned", "pinned-1core"]
            .into_iter()
            .filter(|p| self.latency.iter().any(|r| r.pinning == *p))
            .collect();
        let sizes: Vec<usize> = crate::latency::SIZES
            .iter()
            .map(|(size, _)| *size)
            .collect();
        let value = |r: &LatencyRow, p: usize| match p {
            0 => r.latency.p50_us,
            1 => r.latency.p99_us,
            _ => r.latency.p999_us,
        };
        let all: Vec<f64> = self
            .latency
            .iter()
            .flat_map(|r| [r.latency.p50_us, r.latency.p99_us, r.latency.p999_us])
            .filter(|v| *v > 0.0)
            .collect();
        let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(0.1);
        let hi = all.iter().copied().fold(0.0, f64::max).max(lo * 10.0);
        let (lo_exp, hi_exp) = (lo.log10().floor(), hi.log10().ceil());
        let (bar_w, gap_p, gap_s, left, panel_h, top) = (14.0, 10.0, 34.0, 70.0, 260.0, 50.0);
        let group_w = pcts.len() as f64 * (impls.len() as f64 * bar_w + gap_p);
        let width = left + sizes.len() as f64 * (group_w + gap_s) + 20.0;
        let height = top + pinnings.len() as f64 * (panel_h + 70.0) + 30.0;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="20" font-size="14" font-weight="bold">Sequential call latency, one caller thread (µs, log scale; lower is better)</text>"#
        );
        let mut lx = left;
        for (name, color) in impls {
            let _ = writeln!(
                s,
                r#"<rect x="{lx}" y="30" width="10" height="10" fill="{color}"/><text x="{}" y="39">{name}</text>"#,
                lx + 14.0
            );
            lx += 110.0;
        }
        for (pi, pinning) in pinnings.iter().enumerate() {
            let y0 = top + pi as f64 * (panel_h + 70.0) + 20.0;
            let y_of = |v: f64| {
                let f = (v.max(10f64.powf(lo_exp)).log10() - lo_exp) / (hi_exp - lo_exp);
                y0 + panel_h - f * panel_h
            };
            let _ = writeln!(
                s,
                r#"<text x="{left}" y="{}" font-weight="bold">{pinning}</text>"#,
                y0 - 6.0
            );
            let mut e = lo_exp;
            while e <= hi_exp {
                for m in [1.0, 2.0, 5.0] {
                    let v = m * 10f64.powf(e);
                    if v > 10f64.powf(hi_exp) + 1e-9 {
                        continue;
                    }
                    let y = y_of(v);
                    let stroke = if m == 1.0 { "#bbb" } else { "#e6e6e6" };
                    let _ = writeln!(
                        s,
                        r#"<line x1="{left}" y1="{y:.1}" x2="{:.0}" y2="{y:.1}" stroke="{stroke}"/>"#,
                        width - 20.0
                    );
                    let _ = writeln!(
                        s,
                        r#"<text x="{}" y="{:.1}" text-anchor="end" fill="dimgray">{}</text>"#,
                        left - 6.0,
                        y + 4.0,
                        fmt_axis(v)
                    );
                }
                e += 1.0;
            }
            for (si, size) in sizes.iter().enumerate() {
                let gx = left + 10.0 + si as f64 * (group_w + gap_s);
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{}</text>"#,
                    gx + group_w / 2.0,
                    y0 + panel_h + 32.0,
                    size_label(*size)
                );
                for (pc, pname) in pcts.iter().enumerate() {
                    let cx = gx + pc as f64 * (impls.len() as f64 * bar_w + gap_p);
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="dimgray">{pname}</text>"#,
                        cx + impls.len() as f64 * bar_w / 2.0,
                        y0 + panel_h + 14.0
                    );
                    for (ii, (name, color)) in impls.iter().enumerate() {
                        let Some(r) = self.lat(pinning, name, *size) else {
                            continue;
                        };
                        let v = value(r, pc);
                        let (x, y) = (cx + ii as f64 * bar_w, y_of(v));
                        let _ = writeln!(
                            s,
                            r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{pinning} {} {name} {pname}: {v:.1} µs</title></rect>"#,
                            bar_w - 2.0,
                            (y0 + panel_h - y).max(0.5),
                            size_label(*size)
                        );
                        let _ = writeln!(
                            s,
                            r#"<text x="{:.1}" y="{:.1}" font-size="8" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">{}</text>"#,
                            x + bar_w / 2.0 + 3.0,
                            y - 3.0,
                            x + bar_w / 2.0 + 3.0,
                            y - 3.0,
                            fmt_axis(v)
                        );
                    }
                }
            }
        }
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="{:.0}" fill="dimgray">{} × {} · {} · {}</text>"#,
            height - 10.0,
            self.machine.cores,
            xml_escape(&self.machine.cpu_model),
            xml_escape(&self.machine.kernel),
            if self.settings.as_ref().is_some_and(|s| s.quick) {
                "quick mode"
            } else {
                "full run"
            }
        );
        s.push_str("</svg>\n");
        s
    }

    // ----- stdout --------------------------------------------------------------

    pub fn print_summary(&self) {
        println!("\n==================== pulse bench summary ====================");
        if !self.latency.is_empty() {
            println!(
                "\nlatency (µs)         {:>10} {:>8} {:>8} {:>8} {:>8}  {:>7} {:>7} {:>7}  {:>8}",
                "impl", "p50", "p99", "p99.9", "calls", "p50/raw", "p99/raw", "999/raw", "p50/spin"
            );
            for r in &self.latency {
                println!(
                    "{:<12} {:>7} {:>10} {:>8.1} {:>8.1} {:>8.1} {:>8}  {:>7} {:>7} {:>7}  {:>8}",
                    r.pinning,
                    size_label(r.payload),
                    r.implementation.trim_start_matches("pulse-"),
                    r.latency.p50_us,
                    r.latency.p99_us,
                    r.latency.p999_us,
                    r.calls,
                    fmt_ratio(r.ratio_p50),
                    fmt_ratio(r.ratio_p99),
                    fmt_ratio(r.ratio_p999),
                    fmt_ratio(r.ratio_spin_p50)
                );
            }
        }
        if !self.throughput.is_empty() {
            println!("\nthroughput");
            for r in &self.throughput {
                print_tp(r);
            }
        }
        for h in &self.heartbeat {
            println!(
                "\nheartbeats {:<3}: {} conns, provider CPU {:.2} % of a core ({} in the kernel; consumers' bare loop {:.2} %), RSS/conn {:.0} B{}",
                h.heartbeats,
                h.open_at_end,
                h.cpu_pct_one_core,
                kernel_cell(h),
                h.consumers.cpu_pct,
                h.rss_per_conn_bytes,
                h.error
                    .as_ref()
                    .map_or(String::new(), |e| format!(" (error: {e})"))
            );
        }
        if let Some(t) = &self.timer {
            println!(
                "\ntimer wheel, {} live: schedule+cancel {:.1} ns/pair; busy tick {:.1} µs ({:.0} fired); empty tick {:.1} ns",
                t.live_timers,
                t.schedule_cancel_ns_per_pair,
                t.busy_advance_ns_per_tick / 1000.0,
                t.busy_fired_per_tick,
                t.empty_advance_ns_per_tick
            );
        }
        if let Some(l) = &self.liveness {
            let d = &l.detection_from_freeze;
            let b = &l.reconnect_from_bind;
            println!(
                "\nliveness {}ms×{}: detection min/p50/max {:.0}/{:.0}/{:.0} ms over {} trials (target {:.0}); reconnect after bind {:.0}/{:.0}/{:.0} ms over {}",
                l.interval_ms,
                l.max_missed,
                d.min_ms,
                d.p50_ms,
                d.max_ms,
                d.trials,
                l.target_ms,
                b.min_ms,
                b.p50_ms,
                b.max_ms,
                b.trials
            );
        }
        if !self.targets.is_empty() {
            println!("\ntargets (goals, not assertions):");
            for t in &self.targets {
                let met = match t.met {
                    Some(true) => "met",
                    Some(false) => "MISSED",
                    None => "n/a",
                };
                println!("  [{met:^6}] {} — {}", t.target, t.measured);
            }
        }
        for e in &self.errors {
            println!("section error: {e}");
        }
    }
}

pub fn print_tp(r: &ThroughputRow) {
    println!(
        "  {:<11} {:<12} {:>2} thr {:>2} conn  {:>10.0} /s  {:>7}  cpu {:>5.1} µs/op{}{}",
        r.key,
        r.implementation,
        r.threads,
        r.connections,
        r.ops_per_s,
        fmt_ratio(r.ratio),
        r.cpu_us_per_op,
        r.handled_per_s.map_or(String::new(), |_| format!(
            "  handled/s {}",
            handled_cell(r)
        )),
        if r.errors + r.warmup_errors > 0 {
            format!("  errors {} (+{} in warm-ups)", r.errors, r.warmup_errors)
        } else {
            String::new()
        }
    );
}

/// A throughput row's round rates, in the order measured: `a / b / c`.
fn rounds_cell(rates: &[f64]) -> String {
    if rates.is_empty() {
        return "–".into();
    }
    rates
        .iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

pub fn size_label(n: usize) -> String {
    if n >= 1024 * 1024 && n.is_multiple_of(1024 * 1024) {
        format!("{} MiB", n / (1024 * 1024))
    } else if n >= 1024 && n.is_multiple_of(1024) {
        format!("{} KiB", n / 1024)
    } else {
        format!("{n} B")
    }
}

fn fmt_axis(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// A one-way row's handled calls per second, and how many of all its sends
/// the receiver never handled ("–" for other rows).
fn handled_cell(r: &ThroughputRow) -> String {
    match (r.handled_per_s, r.sent_and_lost) {
        (Some(h), Some((sent, lost))) => format!("{h:.0}; lost {lost} of {sent} sent"),
        (Some(h), None) => format!("{h:.0}"),
        (None, _) => "–".into(),
    }
}

/// A heartbeat row's kernel share of the provider's CPU ("—" when the
/// window had too little CPU to split).
fn kernel_cell(h: &HeartbeatRow) -> String {
    h.kernel_share_pct
        .map_or("—".to_string(), |k| format!("{k:.0} %"))
}

/// A throughput row's errors in its windows, then those in its warm-ups
/// when there were any, and the first error with where it happened.
fn tp_errors_cell(r: &ThroughputRow) -> String {
    let cell = errors_cell(r.errors, r.first_error.as_deref());
    if r.warmup_errors == 0 {
        return cell;
    }
    let first = r
        .first_error
        .as_deref()
        .map_or(String::new(), |e| format!(" ({})", e.replace('|', "/")));
    format!(
        "{} in the windows + {} in the warm-ups{first}",
        r.errors, r.warmup_errors
    )
}

fn errors_cell(n: u64, first: Option<&str>) -> String {
    match (n, first) {
        (0, _) => "0".into(),
        (n, Some(e)) => format!("{n} ({})", e.replace('|', "/")),
        (n, None) => n.to_string(),
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
