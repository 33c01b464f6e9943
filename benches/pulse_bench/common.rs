//! Shared helpers: settings, statistics, process CPU and memory, child
//! processes, the machine description.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Environment variable that selects the role of a re-executed bench binary.
pub const ROLE_ENV: &str = "PULSE_BENCH_ROLE";
/// Prefix of the one line a child process prints with its result (JSON).
pub const RESULT_PREFIX: &str = "RESULT ";

/// Run-wide settings, from the environment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// `PULSE_BENCH_QUICK=1`: every count about 10× smaller (a smoke run).
    pub quick: bool,
    /// `PULSE_BENCH_ONLY=latency,throughput,...`: run only these sections.
    pub only: Option<Vec<String>>,
    /// `PULSE_BENCH_ROWS=pipelined,oneway,...`: of the throughput section,
    /// run only the rows with these keys (raw and pulse alike; for
    /// profiling one row in the bench's own harness).
    #[serde(default)]
    pub rows: Option<Vec<String>>,
    /// `PULSE_BENCH_IDLE_CONNS` (default 5,000; quick 1,000).
    pub idle_conns: usize,
}

impl Settings {
    pub fn from_env() -> Settings {
        let quick = std::env::var("PULSE_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let only = env_list("PULSE_BENCH_ONLY");
        let rows = env_list("PULSE_BENCH_ROWS");
        let idle_conns = env_parse("PULSE_BENCH_IDLE_CONNS", if quick { 1_000 } else { 5_000 });
        Settings {
            quick,
            only,
            rows,
            idle_conns,
        }
    }

    /// `full` in a normal run, about a tenth of it in quick mode.
    pub fn count(&self, full: u64) -> u64 {
        if self.quick { (full / 10).max(1) } else { full }
    }

    /// A measuring window: `full` normally, a third of it in quick mode.
    pub fn window(&self, full: Duration) -> Duration {
        if self.quick { full / 3 } else { full }
    }

    pub fn wants(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|s| s == section))
    }

    /// Whether the throughput row with `key` is to run (`PULSE_BENCH_ROWS`).
    pub fn wants_row(&self, key: &str) -> bool {
        self.rows
            .as_ref()
            .is_none_or(|rows| rows.iter().any(|r| r == key))
    }
}

/// A small deterministic PRNG (xorshift64*), so runs are repeatable without a
/// `rand` dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The environment variable `key` as a comma-separated list, if it is set
/// and names something.
fn env_list(key: &str) -> Option<Vec<String>> {
    let list: Vec<String> = std::env::var(key)
        .ok()?
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    (!list.is_empty()).then_some(list)
}

/// The environment variable `key` parsed as a `T`, or `default` when it is
/// unset or does not parse.
pub fn env_parse<T: std::str::FromStr>(key: &str, default: T) -> T {
    env_opt(key).unwrap_or(default)
}

/// The environment variable `key` parsed as a `T`, if it is set and parses.
pub fn env_opt<T: std::str::FromStr>(key: &str) -> Option<T> {
    std::env::var(key).ok()?.parse().ok()
}

/// A latency histogram in nanoseconds, 3 significant digits, 1 ns to 100 s.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

pub fn record(hist: &mut Histogram<u64>, elapsed: Duration) {
    let ns = u64::try_from(elapsed.as_nanos())
        .unwrap_or(u64::MAX)
        .clamp(1, 100_000_000_000);
    hist.saturating_record(ns);
}

/// Percentiles of a histogram, in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    pub fn of(hist: &Histogram<u64>) -> Percentiles {
        let us = |ns: u64| ns as f64 / 1000.0;
        Percentiles {
            count: hist.len(),
            mean_us: hist.mean() / 1000.0,
            p50_us: us(hist.value_at_quantile(0.50)),
            p90_us: us(hist.value_at_quantile(0.90)),
            p99_us: us(hist.value_at_quantile(0.99)),
            p999_us: us(hist.value_at_quantile(0.999)),
            max_us: us(hist.max()),
        }
    }
}

/// min / p50 / p90 / p99 / max of a small sample (e.g. 20 trials), in ms.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Distribution {
    pub trials: usize,
    pub min_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    pub samples_ms: Vec<f64>,
}

impl Distribution {
    pub fn of(samples: &[Duration]) -> Distribution {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(|a, b| a.total_cmp(b));
        if ms.is_empty() {
            return Distribution::default();
        }
        // Nearest-rank percentiles: with 20 samples p99 is the maximum.
        let rank = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        Distribution {
            trials: ms.len(),
            min_ms: ms[0],
            p50_ms: rank(0.50),
            p90_ms: rank(0.90),
            p99_ms: rank(0.99),
            max_ms: ms[ms.len() - 1],
            mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
            samples_ms: ms.iter().map(|v| (v * 1000.0).round() / 1000.0).collect(),
        }
    }
}

/// CPU time (user + system) of this whole process, all threads including
/// exited ones: `CLOCK_PROCESS_CPUTIME_ID` (nanoseconds, from the
/// scheduler's accounting), or `/proc/self/stat` (10 ms ticks) if that
/// clock cannot be read.
pub fn process_cpu() -> Duration {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID) {
        Ok(t) => Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32),
        Err(_) => {
            let (user, system) = process_cpu_split();
            user + system
        }
    }
}

/// CPU time of this whole process in user space and in the kernel (`utime`
/// and `stime` of `/proc/self/stat`, 10 ms resolution); zero when unreadable.
pub fn process_cpu_split() -> (Duration, Duration) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return (Duration::ZERO, Duration::ZERO);
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return (Duration::ZERO, Duration::ZERO);
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let ticks = |i: usize| {
        let n = fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0);
        Duration::from_millis(n * 10)
    };
    (ticks(11), ticks(12))
}

/// CPU time of the live threads of this process with nanosecond precision
/// (`se.sum_exec_runtime` of `/proc/self/task/*/sched`); falls back to
/// [`process_cpu`] when the scheduler does not expose it. Threads that exit
/// between two readings are lost, so use it only over a window in which no
/// thread exits.
pub fn threads_cpu_precise() -> (Duration, &'static str) {
    let mut total_ms = 0.0;
    let mut found = false;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let Ok(sched) = std::fs::read_to_string(task.path().join("sched")) else {
                continue;
            };
            for line in sched.lines() {
                if let Some(v) = line.strip_prefix("se.sum_exec_runtime")
                    && let Some(v) = v.split(':').nth(1)
                    && let Ok(ms) = v.trim().parse::<f64>()
                {
                    total_ms += ms;
                    found = true;
                }
            }
        }
    }
    if found {
        (
            Duration::from_secs_f64(total_ms / 1000.0),
            "sum of /proc/self/task/*/sched se.sum_exec_runtime",
        )
    } else {
        (process_cpu(), "CLOCK_PROCESS_CPUTIME_ID")
    }
}

/// Resident set size of this process in KiB (`VmRSS`).
pub fn rss_kib() -> u64 {
    status_field("VmRSS:")
}

/// Number of threads of this process.
pub fn thread_count() -> u64 {
    status_field("Threads:")
}

fn status_field(name: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// What the numbers were measured on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub rustc: String,
    pub git: String,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub fd_limit: String,
    pub started_unix: u64,
    pub taskset: bool,
}

impl Machine {
    pub fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let cores = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count()
            .max(std::thread::available_parallelism().map_or(1, |n| n.get()));
        let kernel = std::fs::read_to_string("/proc/version")
            .map(|v| v.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| command_line("uname", &["-sr"]));
        let git_rev = command_line(
            "git",
            &[
                "-C",
                env!("CARGO_MANIFEST_DIR"),
                "rev-parse",
                "--short",
                "HEAD",
            ],
        );
        let dirty = !command_line(
            "git",
            &[
                "-C",
                env!("CARGO_MANIFEST_DIR"),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "src",
            ],
        )
        .is_empty();
        Machine {
            cpu_model,
            cores,
            kernel,
            rustc: command_line("rustc", &["-V"]),
            git: if dirty {
                format!("{git_rev} + uncommitted changes in src/")
            } else {
                git_rev
            },
            loadavg_start: loadavg(),
            loadavg_end: String::new(),
            fd_limit: command_line("sh", &["-c", "ulimit -n"]),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            taskset: Command::new("taskset")
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok(),
        }
    }
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The first line a command prints, or "" when it cannot run.
pub fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// A command that re-executes this bench binary in another role.
pub fn self_command(role: &str, pin_to_cpu0: bool) -> Command {
    let exe = std::env::current_exe().expect("the bench binary knows its own path");
    let mut cmd = if pin_to_cpu0 {
        let mut c = Command::new("taskset");
        c.arg("-c").arg("0").arg(exe);
        c
    } else {
        Command::new(exe)
    };
    cmd.env(ROLE_ENV, role);
    cmd
}

/// Runs a child to completion (killing it after `timeout`) and returns the
/// JSON of its `RESULT` line.
pub fn run_child_for_result(mut cmd: Command, timeout: Duration) -> Result<String, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start child: {e}"))?;
    let lines = child_lines(&mut child);
    let deadline = Instant::now() + timeout;
    let mut result = None;
    loop {
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if let Some(json) = line.strip_prefix(RESULT_PREFIX) {
                    result = Some(json.to_string());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("child timed out after {timeout:?}"));
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    match result {
        Some(json) => Ok(json),
        None => Err(format!("child exited ({status}) without a result")),
    }
}

/// The child's stdout, line by line, on a channel (a reader thread).
pub fn child_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

/// Reads stdin until EOF (or a line "stop") on a thread; the flag turns true then.
pub fn stop_on_stdin_eof() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let set = flag.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) if buf[..n].windows(4).any(|w| w == b"stop") => break,
                Ok(_) => {}
            }
        }
        set.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    flag
}

/// Prints the one result line of a child process.
pub fn print_result<T: Serialize>(value: &T) {
    let json = serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    println!("{RESULT_PREFIX}{json}");
}

/// A ratio `a / b`, `None` when either is not a positive finite number.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (a.is_finite() && b.is_finite() && a > 0.0 && b > 0.0).then(|| a / b)
}

pub fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "–".to_string(), |r| format!("{r:.2}×"))
}

/// A ratio printed next to the goal it is judged against: with two
/// decimals, or more when two would print the goal itself (2.002× against
/// a goal of 2× would read "2.00×", not met).
pub fn fmt_ratio_against(r: Option<f64>, goal: f64) -> String {
    match r {
        Some(r) if r != goal => {
            let mut decimals = 2;
            while decimals < 6 && format!("{r:.decimals$}") == format!("{goal:.decimals$}") {
                decimals += 1;
            }
            format!("{r:.decimals$}×")
        }
        _ => fmt_ratio(r),
    }
}
