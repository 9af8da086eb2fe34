//! The real binary: SIGHUP re-reads the whole config (a flag's default
//! reaches the origin within 2 s, the cache survives), an invalid file is
//! refused with its location and the old config stays, JSON logs are one
//! object per line, and `check-config` refuses what a start would.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The binary; killed when dropped.
struct Process {
    child: std::process::Child,
    listen: String,
    log: PathBuf,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    async fn start(config: &Path, origin: &str, log: PathBuf) -> Process {
        let listen = format!("127.0.0.1:{}", free_port());
        let file = std::fs::File::create(&log).expect("log file");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .arg("--config")
            .arg(config)
            .args(["--listen", &listen, "--origin", origin])
            .env_remove("RUST_LOG")
            .env_remove("KVGATE_ADMIN_TOKEN")
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("kvgate starts");
        let mut p = Process { child, listen, log };
        for _ in 0..500 {
            if try_get(&p.url("/ready-check")).await.is_ok() {
                return p;
            }
            if let Some(status) = p.child.try_wait().expect("try_wait") {
                panic!("kvgate exited with {status}: {}", p.log_text());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("kvgate did not start: {}", p.log_text());
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listen)
    }

    fn hup(&self) {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(ok.success());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every log line, each of which must be one JSON object.
    fn json_lines(&self) -> Vec<Value> {
        self.log_text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    }
}

fn config(flag_on: bool, extra: &str) -> String {
    format!(
        "[log]\nformat = \"json\"\nlevel = \"info\"\n\n[state]\nbackend = \"memory\"\n\n\
         [edge]\n[edge.flags.newUI]\ndefault = {flag_on}\n{extra}"
    )
}

fn flags_seen(s: &Seen) -> String {
    s.headers
        .get("x-feature-flags")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn sighup_applies_a_flag_default_keeps_the_cache_and_refuses_a_bad_file() {
    let origin = Origin::start(|s, n| {
        Reply::ok(&format!("{} v{n} [{}]", s.path, flags_seen(s)))
            .header("cache-control", "max-age=600")
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("kvgate.toml");
    std::fs::write(&file, config(false, "")).expect("write");
    let p = Process::start(&file, &origin.url(), dir.path().join("log")).await;

    let cached = get_with(&p.url("/kept"), &[("user-agent", "reload-test")]).await;
    assert_eq!(cached.x_cache(), "MISS");
    assert!(cached.text().contains("newui=?0"), "{}", cached.text());

    std::fs::write(&file, config(true, "")).expect("write");
    p.hup();
    let sent = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let g = get(&p.url(&format!("/fresh{n}"))).await;
        assert!(g.status.is_success(), "no failed request during the reload");
        if !g.text().contains("newui=?0") && g.text().contains("newui") {
            break;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "the new default did not reach the origin within 2 s: {}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The memory cache survived: still the old body, from the cache.
    let again = get(&p.url("/kept")).await;
    assert_eq!(
        (again.x_cache(), again.text()),
        ("HIT", cached.text()),
        "cache kept"
    );

    // An invalid file: refused with its location, the running config stays.
    std::fs::write(&file, config(false, "[cache]\nshards = 0\n")).expect("write");
    p.hup();
    let deadline = Instant::now() + Duration::from_secs(5);
    let refusal = loop {
        let found = p.json_lines().into_iter().find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("reload refused"))
        });
        if let Some(line) = found {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "no refusal logged: {}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let error = refusal["error"].as_str().unwrap_or("").to_string();
    assert!(
        error.contains("kvgate.toml:12:1") && error.contains("cache.shards"),
        "{error}"
    );
    let still = get(&p.url("/after-refusal")).await;
    assert!(
        !still.text().contains("newui=?0"),
        "the reloaded flag stays: {}",
        still.text()
    );

    // JSON logs: every line parses; the access line has the request's fields.
    let lines = p.json_lines();
    let access = lines
        .iter()
        .find(|l| l["path"] == "/kept" && l["user_agent"] == "reload-test")
        .unwrap_or_else(|| panic!("no access line: {}", p.log_text()));
    assert_eq!(
        access["request_id"].as_str(),
        Some(cached.header("x-request-id"))
    );
    for field in [
        "timestamp",
        "client",
        "method",
        "host",
        "status",
        "cache",
        "micros",
    ] {
        assert!(!access[field].is_null(), "{field} missing: {access}");
    }
    assert_eq!(access["cache"], "MISS");
    assert!(access["origin_micros"].as_u64().is_some(), "{access}");
    assert!(
        !p.log_text().contains('\u{1b}'),
        "no colour codes in a file"
    );
}

#[tokio::test]
async fn check_config_refuses_what_start_refuses_with_locations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "[admin]\nlisten = \"0.0.0.0:9090\"\n",
            "2:1: admin.listen",
        ),
        (
            "[server]\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"\n",
            "2:1: server.tls_cert",
        ),
        (
            "[state]\npath = \"/nonexistent/dir/s.redb\"\n[edge]\n",
            "2:1: state.path",
        ),
        ("[log]\nlevel = \"inof\"\n", "2:1: log.level"),
        (
            "[[route]]\nname = \"a\"\nprefix = \"/a/\"\n[[route]]\nname = \"a\"\nprefix = \"/b/\"\n",
            "5:1: route.1.name",
        ),
        ("[cache]\nshards = 0\n", "2:1: cache.shards"),
        (
            "[edge.experiments]\nx = { variants = { a = 1 }, traffic = 7.0 }\n",
            "2:29: edge.experiments.x.traffic",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .args(["check-config", "--config"])
            .arg(&path)
            .env_remove("KVGATE_ADMIN_TOKEN")
            .output()
            .expect("run kvgate");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted {text:?}");
        assert!(
            err.contains(&format!("bad{i}.toml:{expected}")),
            "{text:?}: {err}"
        );
    }
}

/// A hit answered by the HTTP/1.1 fast path writes the access line the
/// usual path writes for it (same fields and values, its own id).
#[tokio::test]
async fn a_fast_hit_logs_the_access_line_a_usual_hit_logs() {
    let origin =
        Origin::start(|_, _| Reply::ok("logged body").header("cache-control", "max-age=60")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let base = "[log]\nformat = \"json\"\nlevel = \"info\"\n";
    let mut lines = Vec::new();
    for (name, extra) in [("fast", ""), ("usual", "[server]\nfast_hits = false\n")] {
        let file = dir.path().join(format!("{name}.toml"));
        std::fs::write(&file, format!("{base}{extra}")).expect("write");
        let p = Process::start(&file, &origin.url(), dir.path().join(format!("{name}.log"))).await;
        let ua = [("user-agent", "fast-path-test")];
        let miss = get_with(&p.url("/logged?q=1"), &ua).await;
        assert_eq!(miss.x_cache(), "MISS");
        let hit = get_with(&p.url("/logged?q=1"), &ua).await;
        assert_eq!((hit.x_cache(), hit.text().as_str()), ("HIT", "logged body"));
        let id = hit.header("x-request-id").to_string();
        let line = eventually_line(&p, &id).await;
        assert_eq!(line["host"].as_str(), Some(p.listen.as_str()));
        lines.push(line);
    }
    let (fast, usual) = (&lines[0], &lines[1]);
    for field in ["method", "path", "status", "cache", "bytes", "user_agent"] {
        assert_eq!(fast[field], usual[field], "{field}: {fast} vs {usual}");
    }
    assert_eq!(fast["cache"], "HIT");
    assert_eq!(fast["path"], "/logged?q=1");
    assert_eq!(fast["bytes"], 11);
    let keys = |v: &Value| {
        let mut k: Vec<String> = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        k.sort();
        k
    };
    assert_eq!(keys(fast), keys(usual), "the same fields");
}

/// The access line carrying `request_id`, once it is written.
async fn eventually_line(p: &Process, request_id: &str) -> Value {
    for _ in 0..200 {
        if let Some(l) = p
            .json_lines()
            .into_iter()
            .find(|l| l["request_id"] == request_id && !l["cache"].is_null())
        {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no access line for {request_id}: {}", p.log_text());
}
