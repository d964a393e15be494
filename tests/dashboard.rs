//! The dashboard in a real browser: eventsys on port 0, Debian's Chromium
//! headless, driven through chromedriver (WebDriver) the way a person would
//! use the page: click the scenario buttons, fill in the fault form, press
//! redrive, and read the figures the page shows.
//!
//! On a machine without Chromium the browser part is skipped with a message,
//! so a plain `cargo test` works anywhere; with `CI` set it fails instead,
//! because CI installs Chromium and must run it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const INSTALL_HINT: &str = "apt-get install chromium chromium-driver";

/// How long any one step may take before the test fails (debug build, 2 cores).
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_drives_every_part_of_the_pipeline() {
    let server = TestServer::start().await;
    assets_are_embedded_and_self_contained(&server.url).await;

    if !browser_installed() {
        server.stop().await;
        return;
    }
    let browser = Browser::launch().await;
    let outcome = drive_the_page(&browser.client, &server.url).await;
    if outcome.is_err() {
        // A picture of the failing page says more than the assertion.
        let _ = save_screenshot(&browser.client, "dashboard-failure.png").await;
    }
    browser.close().await;
    server.stop().await;
    if let Err(message) = outcome {
        panic!("{message}");
    }
}

const READER_TOKEN: &str = "reader-token-for-the-dashboard";
const PRODUCER_TOKEN: &str = "producer-token-for-the-dashboard";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_asks_for_a_token_and_offers_only_what_the_role_allows() {
    let dir =
        std::env::temp_dir().join(format!("eventsys-dashboard-tokens-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokens");
    std::fs::write(
        &file,
        format!("rita reader {READER_TOKEN}\npat producer {PRODUCER_TOKEN}\n"),
    )
    .unwrap();
    let server = TestServer::with(|c| c.auth_tokens_file = Some(file.clone())).await;
    if !browser_installed() {
        server.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let browser = Browser::launch().await;
    let outcome = sign_in_as_a_reader(&browser.client, &server.url).await;
    if outcome.is_err() {
        let _ = save_screenshot(&browser.client, "dashboard-token-failure.png").await;
    }
    browser.close().await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(message) = outcome {
        panic!("{message}");
    }
}

/// A reader opens the page, is asked for a token, gives it, and sees the
/// pipeline and its live events but no control it may not use.
async fn sign_in_as_a_reader(c: &Client, url: &str) -> Result<(), String> {
    c.goto(url).await.map_err(|e| format!("open {url}: {e}"))?;
    wait_until(
        c,
        "the page to ask for a token",
        "return !document.getElementById('auth').hidden",
    )
    .await?;
    find(c, "#auth-token")
        .await?
        .send_keys(READER_TOKEN)
        .await
        .map_err(|e| format!("type the token: {e}"))?;
    click(c, "#auth button[type=submit]").await?;
    wait_until(
        c,
        "the page to start with the token",
        "return document.body.dataset.ready === '1' && document.body.dataset.role === 'reader'
            && document.getElementById('whoami-name').textContent.includes('rita')",
    )
    .await?;
    wait_until(
        c,
        "the controls a reader cannot use to be hidden, and the pipeline shown",
        "const hidden = (sel) => getComputedStyle(document.querySelector(sel)).display === 'none';
         return hidden('#operate') && hidden('#drive') && hidden('#scenario-bad')
            && !hidden('#feed-panel') && document.querySelectorAll('[data-node]').length > 20",
    )
    .await?;
    // The live stream carries the token too: a write by a producer shows.
    let http = reqwest::Client::new();
    let response = http
        .post(format!("{url}/raw/movies"))
        .bearer_auth(PRODUCER_TOKEN)
        .json(&json!({"id": "m-token", "title": "Seen by a reader"}))
        .send()
        .await
        .map_err(|e| format!("post a movie: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("posting a movie answered {}", response.status()));
    }
    wait_until(
        c,
        "the reader's feed to show the producer's write",
        "return [...document.querySelectorAll('#feed li')].some(li => li.dataset.table === 'raw_movies')",
    )
    .await?;
    no_page_errors(c).await
}

/// The story of the test: each step is what a person does, then what they see.
async fn drive_the_page(c: &Client, url: &str) -> Result<(), String> {
    c.goto(url).await.map_err(|e| format!("open {url}: {e}"))?;
    wait_until(
        c,
        "the page to finish starting (document.body.dataset.ready)",
        "return document.body.dataset.ready === '1'",
    )
    .await?;
    no_page_errors(c).await?;

    // Scenario 2: a series with 3 episodes, then a newer version listing 2.
    click(c, "#scenario-2").await?;
    wait_until(
        c,
        "scenario 2 to finish and the episodes node to show 2",
        "return document.querySelector('#scenario-2-result').dataset.done === '1'
            && document.querySelector('[data-node=\"episodes\"] .count').textContent === '2'
            && document.querySelector('[data-node=\"series\"] .count').textContent === '1'",
    )
    .await?;

    // Inspect: click the episodes table, then a record, and see its causation chain.
    click(c, "[data-node=\"episodes\"]").await?;
    wait_until(
        c,
        "the inspector to list the 2 episodes",
        "return document.querySelectorAll('#records tr[data-record]').length === 2",
    )
    .await?;
    click(c, "#records tr[data-record]").await?;
    wait_until(
        c,
        "the causation chain episodes <- raw_episodes <- raw_series",
        "const steps = [...document.querySelectorAll('#causation li[data-seq]')].map(li => li.textContent);
         return steps.length >= 3 && steps[0].includes('episodes') && steps[1].includes('raw_episodes')
            && steps[2].includes('raw_series')",
    )
    .await?;

    // Scenario 5: the actor's filmography appears once they are live.
    click(c, "#scenario-5").await?;
    wait_until(
        c,
        "scenario 5 to finish with both movies in the actor's filmography",
        "const result = document.querySelector('#scenario-5-result');
         return result.dataset.done === '1' && result.textContent.includes('Hidden Figures (2016)')
            && document.querySelector('[data-node=\"filmography\"] .count').textContent === '1'",
    )
    .await?;

    // Operate: a permanent fault on encode_handler, set through the form.
    let rate = find(c, "#fault-encode_handler input[name=\"failure_rate\"]").await?;
    rate.clear()
        .await
        .map_err(|e| format!("clear failure rate: {e}"))?;
    rate.send_keys("1")
        .await
        .map_err(|e| format!("type failure rate: {e}"))?;
    click(c, "#fault-encode_handler input[name=\"permanent\"]").await?;
    click(c, "#fault-apply-encode_handler").await?;
    wait_until(
        c,
        "the page to show the permanent fault",
        "return document.querySelector('#fault-state-encode_handler').textContent === 'failing 100% · permanent'",
    )
    .await?;

    // Scenario 3: a video with 3 renditions; every encode job fails for good.
    click(c, "#scenario-3").await?;
    wait_until(
        c,
        "3 dead letters listed for encode_queue, with their error and attempts",
        "const rows = [...document.querySelectorAll('#dead-letters-encode_queue [data-dead-letter]')];
         return rows.length === 3 && rows.every(r => r.textContent.includes('injected fault')
            && r.textContent.includes('1 attempt'))
            && document.querySelector('[data-node=\"videos\"] .count').textContent === '1'",
    )
    .await?;

    // Clear the fault, redrive, and the encodes complete.
    click(c, "#fault-clear-encode_handler").await?;
    wait_until(
        c,
        "the page to show no fault",
        "return document.querySelector('#fault-state-encode_handler').textContent === 'no fault'",
    )
    .await?;
    click(c, "#redrive-encode_queue").await?;
    wait_until(
        c,
        "the encodes node to reach 3 and the dead letters to empty",
        "return document.querySelector('[data-node=\"encodes\"] .count').textContent === '3'
            && document.querySelectorAll('#dead-letters-encode_queue [data-dead-letter]').length === 0",
    )
    .await?;

    // The live feed is fed by /events/stream: the encodes arrived through it.
    wait_until(
        c,
        "the live event feed to show the encodes",
        // Failed, compensated and encoded again: at least the three last.
        "return [...document.querySelectorAll('#feed li')].filter(li => li.dataset.table === 'encodes').length >= 3",
    )
    .await?;

    // Scenario 6: compensated, then published by a retry.
    click(c, "#scenario-6").await?;
    wait_until(
        c,
        "scenario 6 to end published after a compensation and a retry",
        "const result = document.querySelector('#scenario-6-result');
         return result.dataset.done === '1' && result.textContent.includes('published in attempt 2')
            && document.querySelector('[data-node=\"publications\"]').classList.contains('view')",
    )
    .await?;

    // The saga's fault and retry were operator actions: the feed shows
    // their audit records, and the inspector reads the audit table.
    wait_until(
        c,
        "the feed to show the audit records of scenario 6's fault and retry",
        "return [...document.querySelectorAll('#feed li')].filter(li => li.dataset.table === 'audit').length >= 3
            && [...document.querySelectorAll('#inspect-table option')].some(o => o.value === 'audit')",
    )
    .await?;

    c.execute("window.scrollTo(0, 0); return true", vec![])
        .await
        .map_err(|e| format!("scroll to the top: {e}"))?;
    let path = save_screenshot(c, "dashboard.png").await?;
    eprintln!("dashboard screenshot: {}", path.display());

    // On a phone the panels stack and only the diagram scrolls sideways.
    c.set_window_size(390, 1400)
        .await
        .map_err(|e| format!("phone-sized window: {e}"))?;
    wait_until(
        c,
        "the page to fit a phone's width",
        "return document.documentElement.scrollWidth <= window.innerWidth",
    )
    .await?;
    let path = save_screenshot(c, "dashboard-phone.png").await?;
    eprintln!("phone-width screenshot: {}", path.display());
    no_page_errors(c).await
}

// ---------------------------------------------------------------- checks without a browser

/// The page and its assets come from the binary, with their media types,
/// and refer to no other host (it must work offline).
async fn assets_are_embedded_and_self_contained(url: &str) {
    let http = reqwest::Client::new();
    for (path, media_type) in [
        ("/", "text/html"),
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/style.css", "text/css"),
    ] {
        let response = http.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 200, "GET {path}");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        assert!(
            header("content-type").starts_with(media_type),
            "GET {path}: content-type {}",
            header("content-type")
        );
        assert_eq!(header("cache-control"), "no-cache", "GET {path}");
        let etag = header("etag");
        assert!(!etag.is_empty(), "GET {path} has an ETag");
        let body = response.text().await.unwrap();
        // The SVG namespace is a name, not a request; nothing else may name a host.
        let links = body.matches("http").count();
        let namespaces = body.matches("http://www.w3.org/2000/svg").count();
        assert_eq!(links, namespaces, "GET {path} refers to another host");

        let cached = http
            .get(format!("{url}{path}"))
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(cached.status(), 304, "GET {path} with its ETag");
    }
}

/// Whether to run the browser part; with `CI` set, a missing browser fails.
fn browser_installed() -> bool {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|path| !Path::new(path).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let in_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    assert!(
        !in_ci,
        "CI must run the browser test, but {} is missing ({INSTALL_HINT})",
        missing.join(" and ")
    );
    eprintln!("skipping: chromium not installed ({INSTALL_HINT})");
    false
}

// ---------------------------------------------------------------- driving the page

async fn find(c: &Client, selector: &str) -> Result<fantoccini::elements::Element, String> {
    c.find(Locator::Css(selector))
        .await
        .map_err(|e| format!("find {selector}: {e}"))
}

async fn click(c: &Client, selector: &str) -> Result<(), String> {
    // The page renders its tables again as events arrive: an element found
    // just before that is stale, and the one that replaced it is clicked.
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        match find(c, selector).await?.click().await {
            Ok(()) => return Ok(()),
            Err(e) if e.to_string().contains("stale element") && Instant::now() < deadline => {}
            Err(e) => return Err(format!("click {selector}: {e}")),
        }
    }
}

/// Polls a JavaScript condition until it holds, for at most [`STEP_TIMEOUT`];
/// fails early if the page recorded a script error, since it would never hold.
async fn wait_until(c: &Client, what: &str, script: &str) -> Result<(), String> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let value = c
            .execute(script, vec![])
            .await
            .map_err(|e| format!("waiting for {what}: script failed: {e}"))?;
        if value == json!(true) {
            return Ok(());
        }
        no_page_errors(c)
            .await
            .map_err(|e| format!("waiting for {what}: {e}"))?;
        if Instant::now() > deadline {
            return Err(format!(
                "timed out after {STEP_TIMEOUT:?} waiting for {what}; page state: {}",
                page_state(c).await
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Fails if a script error was recorded (see the hook at the top of
/// index.html) or the page shows an API error.
async fn no_page_errors(c: &Client) -> Result<(), String> {
    let errors = c
        .execute(
            "return { script: window.dashboardErrors || ['the error hook did not run'],
                      api: [...document.querySelectorAll('#errors .error')].map(e => e.dataset.message) }",
            vec![],
        )
        .await
        .map_err(|e| format!("read the page's errors: {e}"))?;
    if errors["script"] == json!([]) && errors["api"] == json!([]) {
        Ok(())
    } else {
        Err(format!("the page reported errors: {errors}"))
    }
}

/// What the page shows, for a timeout's message.
async fn page_state(c: &Client) -> Value {
    c.execute(
        "const count = id => document.querySelector(`[data-node=\"${id}\"] .count`)?.textContent;
         return {
           ready: document.body.dataset.ready,
           episodes: count('episodes'), videos: count('videos'), encodes: count('encodes'),
           results: [...document.querySelectorAll('.result')].map(r => r.textContent),
           dead_letters: document.querySelector('#dead-letters-encode_queue')?.textContent,
           fault: document.querySelector('#fault-state-encode_handler')?.textContent,
           stream: document.querySelector('#stream-status')?.textContent,
         }",
        vec![],
    )
    .await
    .unwrap_or_else(|e| json!(format!("unreadable: {e}")))
}

async fn save_screenshot(c: &Client, name: &str) -> Result<PathBuf, String> {
    let png = c
        .screenshot()
        .await
        .map_err(|e| format!("screenshot: {e}"))?;
    let dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, png).map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok(path)
}

// ---------------------------------------------------------------- server and browser

struct TestServer {
    url: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<u64>>,
}

impl TestServer {
    async fn start() -> Self {
        Self::with(|_| {}).await
    }

    async fn with(adjust: impl FnOnce(&mut eventsys::Config)) -> Self {
        let mut config = eventsys::Config {
            encode_delay_ms: 50,
            ..Default::default()
        };
        adjust(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = eventsys::App::start(config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(eventsys::serve(listener, app, async move {
            let _ = stopped.await;
        }));
        Self { url, stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("the server stops within 15 s")
            .expect("the server task does not panic")
            .expect("the server stops cleanly");
    }
}

/// chromedriver plus the Chromium it starts, in a fresh profile.
struct Browser {
    client: Client,
    _driver: Driver,
}

/// The chromedriver process and the profile folder; dropping it (also when a
/// step panics) kills chromedriver and removes the folder.
struct Driver {
    child: Child,
    profile: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Browser {
    async fn launch() -> Self {
        let profile = std::env::temp_dir().join(format!(
            "eventsys-dashboard-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&profile).unwrap();
        let log = profile.join("chromedriver.log");
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {CHROMEDRIVER}: {e}"));
        let driver = Driver { child, profile };
        let client = match connect(port, &driver.profile).await {
            Ok(client) => client,
            Err(e) => {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                let tail = &log[log.len().saturating_sub(4000)..];
                panic!("no WebDriver session: {e}\nchromedriver log (end):\n{tail}");
            }
        };
        // The window the screenshot shows: laptop width, tall enough for every panel.
        client
            .set_window_size(1400, 2200)
            .await
            .expect("size the window");
        Self {
            client,
            _driver: driver,
        }
    }

    async fn close(self) {
        // Ends the session, which makes chromedriver stop Chromium; then
        // dropping the driver stops chromedriver.
        let _ = self.client.clone().close().await;
    }
}

/// Opens a WebDriver session, retrying while chromedriver starts up.
async fn connect(port: u16, profile: &Path) -> Result<Client, String> {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
                "--disable-dev-shm-usage",
                format!("--user-data-dir={}", profile.join("chromium").display()),
            ],
        }),
    );
    // The connector speaks plain HTTP: chromedriver listens on loopback. The
    // `client-legacy` feature it needs comes with fantoccini's own hyper-util.
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let attempt = ClientBuilder::new(connector.clone())
            .capabilities(capabilities.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await;
        match attempt {
            Ok(client) => return Ok(client),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(format!(
                    "{CHROMEDRIVER} gave none within {STEP_TIMEOUT:?}: {e}"
                ));
            }
        }
    }
}

/// A port for chromedriver, which cannot be told to pick its own and report it.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
