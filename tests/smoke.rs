mod common;
use common::*;

#[tokio::test]
async fn miss_then_hit() {
    let origin =
        Origin::start(|_, n| Reply::ok(&format!("v{n}")).header("cache-control", "max-age=60"))
            .await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    let a = get(&gw.url("/a")).await;
    let b = get(&gw.url("/a")).await;
    assert_eq!((a.x_cache(), a.text().as_str()), ("MISS", "v1"));
    assert_eq!((b.x_cache(), b.text().as_str()), ("HIT", "v1"));
    assert_eq!(origin.count("/a"), 1);
}
