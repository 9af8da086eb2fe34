//! The dashboard in a real browser: headless Chromium driven over WebDriver
//! (chromedriver) against a real gateway, admin listener and origin on
//! loopback. Run with `cargo test --features browser-tests --test dashboard`;
//! needs `chromium` and `chromedriver` on PATH (Debian: `chromium
//! chromium-driver`). Screenshots of every page go to
//! `target/dashboard-screenshots/`.

mod common;
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use kvgate::config::Config;
use serde_json::{json, Value};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "browser-test-token-0123456789";
const WAIT: Duration = Duration::from_secs(15);

/// A chromedriver process and a Chromium session through it; both end on drop.
struct Browser {
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        let mut driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver on PATH (apt-get install chromium chromium-driver)");
        let ready = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if ready.elapsed() > Duration::from_secs(20) {
                let _ = driver.kill();
                panic!("chromedriver did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().expect("profile dir");
        // The machine may have no network: without these Chromium stalls
        // on lookups and background fetches.
        let args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1280,1000".into(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("goog:chromeOptions".into(), json!({ "args": args }));
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a Chromium session");
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
    }

    /// Waits until an element matching `css` shows text containing `text`.
    async fn wait_text(&self, css: &str, text: &str) -> String {
        let start = Instant::now();
        loop {
            let mut seen = String::new();
            if let Ok(elements) = self.client.find_all(Locator::Css(css)).await {
                for e in elements {
                    let t = e.text().await.unwrap_or_default();
                    if t.contains(text) {
                        return t;
                    }
                    seen.push_str(&t);
                    seen.push('|');
                }
            }
            if start.elapsed() > WAIT {
                panic!("{css} never showed {text:?}; last saw {seen:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn click(&self, css: &str) {
        self.find(css).await.click().await.expect("click");
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        e.clear().await.expect("clear");
        e.send_keys(text).await.expect("type");
    }

    async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Runs `script`, which ends by calling `done(value)`.
    async fn js_async(&self, script: &str) -> Value {
        let wrapped = format!("const done = arguments[arguments.length - 1];\n{script}");
        self.client
            .execute_async(&wrapped, vec![])
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        println!("screenshot: {}", path.display());
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// `target/dashboard-screenshots`, beside the tests' scratch directory.
fn screenshot_dir() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(&tmp).join("dashboard-screenshots")
}

/// The origin: `/products/*` tagged `catalog`, `/about` tagged `pages`,
/// `/feature` never cached; each body names the flags the origin received.
async fn origin() -> Origin {
    Origin::start(|seen, n| {
        let flags = seen
            .headers
            .get("x-feature-flags")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = format!("{} #{n} flags: {flags}\n", seen.path);
        if seen.path.starts_with("/products/") {
            Reply::ok(&body)
                .header("cache-control", "max-age=300")
                .header("cache-tag", "catalog")
        } else if seen.path == "/about" {
            Reply::ok(&body)
                .header("cache-control", "max-age=300")
                .header("cache-tag", "pages")
        } else {
            Reply::ok(&body).header("cache-control", "no-store")
        }
    })
    .await
}

async fn gateway(origin: &Origin) -> Gateway {
    let toml = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
token = "{TOKEN}"
[state]
backend = "memory"
[edge.identity]
trusted_from = ["127.0.0.0/8"]
[edge.flags.newUI]
default = false
description = "The redesigned UI"
[edge.flags.theme]
default = "dark"
[edge.experiments.new-checkout]
variants = {{ control = 50, variant_a = 25, variant_b = 25 }}
description = "One-page checkout against the current three steps"
"#
    );
    let parsed = Config::parse(&toml, "dashboard-test.toml").expect("test config");
    Gateway::start(&origin.url(), |c| {
        c.edge = parsed.edge;
        c.state = parsed.state;
        c.admin = parsed.admin;
    })
    .await
}

fn admin_url(gw: &Gateway, path: &str) -> String {
    format!(
        "http://{}{path}",
        gw.running.admin_addr.expect("admin runs")
    )
}

async fn sign_in(b: &Browser, token: &str) {
    b.type_into("#token", token).await;
    b.click("#signin-submit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_end_to_end() {
    let origin = origin().await;
    let gw = gateway(&origin).await;
    for path in [
        "/products/1",
        "/products/2",
        "/about",
        "/products/1",
        "/about",
    ] {
        get(&gw.url(path)).await;
    }
    let b = Browser::start().await;
    b.client
        .goto(&admin_url(&gw, "/ui/"))
        .await
        .expect("open the dashboard");

    // A wrong token: a clear message, no way in.
    b.find("#signin-form").await;
    b.screenshot("signin").await;
    let t = Instant::now();
    sign_in(&b, "not-the-token").await;
    b.wait_text("#signin-error", "wrong admin token").await;
    assert!(t.elapsed() >= Duration::from_millis(900), "no delay");
    // Nothing but the form is shown (laid out, not only flagged hidden).
    for css in ["#nav", "#sign-out", "#page-cache"] {
        let shown = b.find(css).await.is_displayed().await.expect("displayed?");
        assert!(!shown, "{css} is shown before signing in");
    }

    // The right one: the cache page, numbers, charts and entries.
    sign_in(&b, TOKEN).await;
    b.wait_text("#entries-table tbody", "/products/1").await;
    assert!(b
        .find("#nav")
        .await
        .is_displayed()
        .await
        .expect("displayed?"));
    assert!(!b
        .find("#page-signin")
        .await
        .is_displayed()
        .await
        .expect("displayed?"));
    // The session cookie is invisible to scripts (HttpOnly).
    let cookies = b.js("return document.cookie").await;
    assert!(
        !cookies.as_str().unwrap_or("").contains("kvgate_session"),
        "{cookies}"
    );
    b.wait_text("#n-entries", "3").await;
    b.wait_text("#n-hit-ratio", "40.0 %").await;
    // Traffic over a few refreshes (every 2 s), so the charts have lines.
    get(&gw.url("/products/3")).await;
    for round in 0..16u64 {
        for i in 0..(5 + round * 2) {
            get(&gw.url(&format!("/products/{}", 1 + i % 3))).await;
        }
        get(&gw.url(&format!("/products/x{round}"))).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let start = Instant::now();
    while b
        .js("return document.querySelectorAll('#chart-rps polyline').length")
        .await
        == json!(0)
    {
        assert!(
            start.elapsed() < WAIT,
            "the request chart never drew a line"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.wait_text("#n-entries", "20").await;
    b.client.set_window_size(1280, 1500).await.expect("resize");
    b.screenshot("cache").await;
    b.client.set_window_size(1280, 1000).await.expect("resize");

    // Purge a tag: the count removed, and the entries gone from the list.
    b.click("input[name='purge-kind'][value='tags']").await;
    b.type_into("#purge-target", "catalog").await;
    b.click("#purge-form button[type='submit']").await;
    b.wait_text("#purge-result", "Removed 19 entries for tag catalog")
        .await;
    let start = Instant::now();
    loop {
        let rows = b.find("#entries-table tbody").await.text().await.unwrap();
        if !rows.contains("/products/") && rows.contains("/about") {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "purged entries still listed: {rows}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(&gw.url("/products/1")).await.x_cache(), "MISS");
    assert_eq!(get(&gw.url("/about")).await.x_cache(), "HIT");

    // Filter the list by prefix.
    b.type_into("#entries-prefix", "/ab").await;
    b.click("#entries-form button").await;
    b.wait_text("#entries-note", "1 shown").await;

    // Version bump: cancelling changes nothing, confirming bumps.
    b.click("#version-bump").await;
    b.click("#version-cancel").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gw.running.gateway.version(), 1);
    b.click("#version-bump").await;
    b.click("#version-confirm").await;
    b.wait_text("#version-result", "Cache version is now 2")
        .await;
    assert_eq!(gw.running.gateway.version(), 2);
    assert_eq!(get(&gw.url("/about")).await.x_cache(), "MISS");

    // A state-changing call without the CSRF header is refused, even from
    // the signed-in page itself.
    let status = b
        .js_async(
            "fetch('/purge', {method: 'POST', credentials: 'same-origin', \
             headers: {'Content-Type': 'application/json'}, body: '{\"urls\":[\"/about\"]}'})\
             .then(r => r.json().then(j => done([r.status, j.error])));",
        )
        .await;
    assert_eq!(status[0], json!(403), "{status}");
    assert!(status[1].as_str().unwrap().contains("X-CSRF-Token"));
    assert_eq!(get(&gw.url("/about")).await.x_cache(), "HIT");

    // Flags: toggle newUI for alice; the origin receives the new value.
    get_with(&gw.url("/feature"), &[("x-user-id", "alice")]).await;
    let before = origin.requests("/feature");
    assert_eq!(
        before[0].headers["x-feature-flags"],
        r#"newui=?0, theme="dark""#
    );
    b.click("#nav a[data-page='flags']").await;
    b.wait_text("#flags-table tbody", "newUI").await;
    b.type_into("#flags-user", "alice").await;
    b.click("#flags-user-form button").await;
    b.wait_text("#flags-user-view button[data-flag='newUI']", "Off")
        .await;
    b.click("#flags-user-view button[data-flag='newUI']").await;
    b.wait_text("#flags-user-view button[data-flag='newUI']", "On")
        .await;
    b.wait_text("#flags-user-view", "override").await;
    get_with(&gw.url("/feature"), &[("x-user-id", "alice")]).await;
    let after = origin.requests("/feature");
    assert_eq!(
        after[1].headers["x-feature-flags"],
        r#"newui, theme="dark""#
    );
    // Other users keep the default.
    get_with(&gw.url("/feature"), &[("x-user-id", "bob")]).await;
    assert_eq!(
        origin.requests("/feature")[2].headers["x-feature-flags"],
        r#"newui=?0, theme="dark""#
    );
    // A string flag is edited in place.
    b.type_into("#ov-theme", "light").await;
    b.click("#flags-user-view button[data-set='theme']").await;
    b.wait_text("#status", "theme = \"light\" for alice").await;
    b.screenshot("flags").await;

    // Experiments: variants, weights, exposures.
    for user in ["u1", "u2", "u3", "u4", "u5", "u6"] {
        get_with(&gw.url("/feature"), &[("x-user-id", user)]).await;
    }
    b.click("#nav a[data-page='experiments']").await;
    b.wait_text("#experiments-list", "new-checkout").await;
    let text = b.wait_text("#experiments-list", "variant_b").await;
    assert!(text.contains("50.0 %"), "{text}");
    b.screenshot("experiments").await;

    // Users: flags with their source, variants, preferences, headers;
    // clearing the override brings the default back.
    b.click("#nav a[data-page='users']").await;
    b.type_into("#users-id", "alice").await;
    b.click("#users-form button").await;
    b.wait_text("#users-view", "Headers the origin receives")
        .await;
    b.wait_text("#users-view", "new-checkout").await;
    b.screenshot("users").await;
    b.click("#users-view button[data-clear='newUI']").await;
    b.wait_text("#users-view button[data-flag='newUI']", "Off")
        .await;
    get_with(&gw.url("/feature"), &[("x-user-id", "alice")]).await;
    let last = origin.requests("/feature").pop().unwrap();
    assert_eq!(
        last.headers["x-feature-flags"],
        r#"newui=?0, theme="light""#
    );

    // A phone-sized window: the cache page still fits.
    b.client.set_window_size(390, 844).await.expect("resize");
    b.click("#nav a[data-page='cache']").await;
    b.wait_text("#entries-table tbody", "/about").await;
    let overflow = b
        .js("return document.documentElement.scrollWidth > window.innerWidth")
        .await;
    assert_eq!(
        overflow,
        json!(false),
        "the page scrolls sideways on a phone"
    );
    b.screenshot("cache-phone").await;
    b.client.set_window_size(1280, 1000).await.expect("resize");

    // How long the page and its data take on loopback (reported, not asserted).
    b.client.refresh().await.expect("reload");
    b.wait_text("#entries-table tbody", "/about").await;
    let timing = b
        .js("const n = performance.getEntriesByType('navigation')[0]; \
             const r = performance.getEntriesByType('resource') \
               .filter(e => /\\/(stats|entries)/.test(e.name)); \
             return {load_ms: n.loadEventEnd - n.startTime, \
                     data_done_ms: Math.max(...r.map(e => e.responseEnd)), \
                     data: r.map(e => [e.name.replace(location.origin, ''), e.duration])};")
        .await;
    println!("timing on loopback: {timing}");

    // Sign out: back to the form, and the API no longer opens.
    b.click("#sign-out").await;
    b.find("#signin-form").await;
    let status = b
        .js_async("fetch('/stats', {credentials: 'same-origin'}).then(r => done(r.status));")
        .await;
    assert_eq!(status, json!(401));
    b.client.clone().close().await.expect("close the session");
}
