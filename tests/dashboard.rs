//! The dashboard in headless Chromium (`--features browser-tests`): not
//! written yet; the socket-level tests are in `dashboard_http.rs`.
