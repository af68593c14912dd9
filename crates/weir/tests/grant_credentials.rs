//! Grants in `basic-auth` and `jwt-auth` environments: the create and regenerate answers carry
//! `credentials` once, which work only in their grant's environment, rotate with and without
//! an overlap, expire, are refused alike whatever the reason, and are never stored, logged or
//! shown readable.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::platform::{fn_path, on_loopback, until_gateway, v1};
use common::{KEY, Weir, send};
use serde_json::{Value, json};

/// What a refusal is: status, body, and the challenge header, if any.
type Answer = (u16, String, Option<String>);

/// `/me` on environment `env` of gateway `api` with `headers`.
async fn hit(w: &Weir, env: &str, headers: &[(&str, &str)]) -> Answer {
    let host = format!("api.{env}.localhost");
    let mut all = vec![("host", host.as_str())];
    all.extend_from_slice(headers);
    let r = send(w.proxy, "GET", "/me", &all, None).await;
    let challenge = r.headers.get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
    (r.status, r.text(), challenge)
}

fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// An HS256 token of `claims` signed with the bytes of `secret`. HS256 is HMAC-SHA256, which
/// `key_auth_hash` computes (in hex).
fn hs256(claims: &Value, secret: &str) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let signed = format!("{}.{}", b64(br#"{"alg":"HS256","typ":"JWT"}"#), b64(claims.to_string().as_bytes()));
    let hex = weir_plugins::key_auth_hash(secret.as_bytes(), &signed);
    let mac: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    format!("{signed}.{}", b64(&mac))
}

/// A token naming `key` for an hour, signed with `secret`.
fn token(key: &str, secret: &str) -> String {
    hs256(&json!({"key": key, "exp": unix_now() + 3600}), secret)
}

/// Polls until `headers` on `env` are let in; what the function saw.
async fn until_ok(w: &Weir, env: &str, headers: &[(&str, &str)]) -> Value {
    let started = Instant::now();
    loop {
        let (s, body, _) = hit(w, env, headers).await;
        if s == 200 {
            return serde_json::from_str(&body).unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "never let in on {env}: {s} {body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls until `headers` on `env` are refused; the refusal.
async fn until_refused(w: &Weir, env: &str, headers: &[(&str, &str)]) -> Answer {
    let started = Instant::now();
    loop {
        let answer = hit(w, env, headers).await;
        if answer.0 == 401 {
            return answer;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "still let in on {env}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn rfc3339_in(secs: i64) -> String {
    (time::OffsetDateTime::now_utc() + time::Duration::seconds(secs)).format(&time::format_description::well_known::Rfc3339).unwrap()
}

#[tokio::test]
async fn basic_and_jwt_grants_work_where_granted_rotate_expire_and_leave_no_secret_behind() {
    let w = on_loopback("");
    assert_eq!(v1(&w, "POST", "api-gateways", Some(json!({"name": "Api", "gatewayId": "api"}))).await.0, 201);
    until_gateway(&w, "api", |_, b| b["phase"] == "Started").await;
    for (env, auth) in [("dev", "basic-auth"), ("staging", "jwt-auth")] {
        let (s, body) = v1(&w, "PATCH", &format!("api-gateways/api/environments/{env}"), Some(json!({"authType": auth}))).await;
        assert_eq!(s, 200, "{body}");
    }
    let me = "export default (ctx) => ({ user: ctx.user ?? null, authorization: ctx.headers.authorization ?? null })";
    assert_eq!(v1(&w, "POST", "api-gateways/api/functions", Some(json!({"name": "me", "source": {"code": me}}))).await.0, 201);
    let (s, body) = v1(&w, "POST", &format!("{}/deploy-to-stage", fn_path("api", "dev/me")), Some(json!({"targetStage": "staging"}))).await;
    assert!(s < 300, "{s} {body}");

    // One application, a grant on each environment: credentials of its type, in the answer.
    let (s, app) = v1(&w, "POST", "applications", Some(json!({"name": "Mobile"}))).await;
    assert_eq!(s, 201, "{app}");
    let app_id = app["appId"].as_str().unwrap().to_string();
    let grants = format!("applications/{app_id}/grants");
    let (s, dev) = v1(&w, "POST", &grants, Some(json!({"gatewayId": "api", "environment": "dev"}))).await;
    assert_eq!(s, 201, "{dev}");
    let dev_id = format!("api-dev-{app_id}");
    assert_eq!(dev["credentialId"], json!(dev_id));
    assert!(dev.get("apiKey").is_none(), "{dev}");
    assert_eq!(dev["credentials"]["username"], json!(dev_id));
    let password = dev["credentials"]["password"].as_str().unwrap().to_string();
    assert!(password.starts_with("sk-") && password.len() == 67, "{password}");
    let (s, staging) = v1(&w, "POST", &grants, Some(json!({"gatewayId": "api", "environment": "staging"}))).await;
    assert_eq!(s, 201, "{staging}");
    let staging_id = format!("api-staging-{app_id}");
    assert_eq!(staging["credentials"]["key"], json!(staging_id));
    let secret = staging["credentials"]["secret"].as_str().unwrap().to_string();
    assert!(secret.len() == 64 && secret.bytes().all(|b| b.is_ascii_hexdigit()), "{secret}");
    let mut passwords = vec![password.clone()];
    let mut secrets = vec![secret.clone()];

    // The basic credentials on dev, the token on staging: each where granted only.
    let dev_auth = basic(&dev_id, &password);
    let seen = until_ok(&w, "dev", &[("authorization", &dev_auth)]).await;
    assert_eq!(seen["user"]["name"], json!(dev_id), "{seen}");
    assert_eq!(seen["authorization"], Value::Null, "the function never holds the password: {seen}");
    assert_eq!(hit(&w, "staging", &[("authorization", &dev_auth)]).await.0, 401, "the basic credentials are not staging's");
    let staging_auth = bearer(&token(&staging_id, &secret));
    let seen = until_ok(&w, "staging", &[("authorization", &staging_auth)]).await;
    assert_eq!(seen["user"]["name"], json!(staging_id), "{seen}");
    assert_eq!(seen["authorization"], Value::Null, "nor the token: {seen}");
    assert_eq!(hit(&w, "dev", &[("authorization", &staging_auth)]).await.0, 401, "the token is not dev's");

    // Wrong password, unknown user, another environment's name: one answer on dev. Bad
    // signature, unknown key, dev's name, a token signed with the seed: one answer on staging.
    let basic_refused = hit(&w, "dev", &[("authorization", &basic(&dev_id, "sk-wrong"))]).await;
    assert_eq!((basic_refused.0, serde_json::from_str::<Value>(&basic_refused.1).unwrap()), (401, json!({"message": "Invalid user authorization"})));
    for auth in [basic("nobody", &password), basic(&staging_id, &secret), basic(&staging_id, &password)] {
        assert_eq!(hit(&w, "dev", &[("authorization", &auth)]).await, basic_refused, "{auth}");
    }
    let jwt_refused = hit(&w, "staging", &[("authorization", &bearer(&token(&staging_id, "not-the-secret")))]).await;
    assert_eq!((jwt_refused.0, serde_json::from_str::<Value>(&jwt_refused.1).unwrap()), (401, json!({"message": "failed to verify jwt"})));
    for t in [token("nobody", &secret), token(&dev_id, &secret), token(&dev_id, &password)] {
        assert_eq!(hit(&w, "staging", &[("authorization", &bearer(&t))]).await, jwt_refused, "{t}");
    }

    // Grants that expire, on both environments.
    let (_, short_app) = v1(&w, "POST", "applications", Some(json!({"name": "Short"}))).await;
    let short_grants = format!("applications/{}/grants", short_app["appId"].as_str().unwrap());
    let expires = rfc3339_in(3);
    let (s, short_dev) = v1(&w, "POST", &short_grants, Some(json!({"gatewayId": "api", "environment": "dev", "expiresAt": expires}))).await;
    assert_eq!(s, 201, "{short_dev}");
    let (s, short_staging) = v1(&w, "POST", &short_grants, Some(json!({"gatewayId": "api", "environment": "staging", "expiresAt": expires}))).await;
    assert_eq!(s, 201, "{short_staging}");
    let short_basic = basic(short_dev["credentials"]["username"].as_str().unwrap(), short_dev["credentials"]["password"].as_str().unwrap());
    let short_token = bearer(&token(short_staging["credentials"]["key"].as_str().unwrap(), short_staging["credentials"]["secret"].as_str().unwrap()));
    passwords.push(short_dev["credentials"]["password"].as_str().unwrap().to_string());
    secrets.push(short_staging["credentials"]["secret"].as_str().unwrap().to_string());
    until_ok(&w, "dev", &[("authorization", &short_basic)]).await;
    until_ok(&w, "staging", &[("authorization", &short_token)]).await;

    // Regenerated with an overlap: old and new both work for its length.
    let dev_grant = format!("{grants}/{}", dev["grantId"].as_str().unwrap());
    let staging_grant = format!("{grants}/{}", staging["grantId"].as_str().unwrap());
    let (s, dev2) = v1(&w, "POST", &format!("{dev_grant}/regenerate"), Some(json!({"overlapSeconds": 2}))).await;
    assert_eq!(s, 200, "{dev2}");
    let (s, staging2) = v1(&w, "POST", &format!("{staging_grant}/regenerate"), Some(json!({"overlapSeconds": 2}))).await;
    assert_eq!(s, 200, "{staging2}");
    assert_eq!(dev2["credentials"]["username"], json!(dev_id));
    assert_eq!(staging2["credentials"]["key"], json!(staging_id));
    let password2 = dev2["credentials"]["password"].as_str().unwrap().to_string();
    let secret2 = staging2["credentials"]["secret"].as_str().unwrap().to_string();
    assert!(password2 != password && secret2 != secret);
    passwords.push(password2.clone());
    secrets.push(secret2.clone());
    let dev_auth2 = basic(&dev_id, &password2);
    let staging_auth2 = bearer(&token(&staging_id, &secret2));
    until_ok(&w, "dev", &[("authorization", &dev_auth2)]).await;
    until_ok(&w, "staging", &[("authorization", &staging_auth2)]).await;
    assert_eq!(hit(&w, "dev", &[("authorization", &dev_auth)]).await.0, 200, "the old password works during the overlap");
    assert_eq!(hit(&w, "staging", &[("authorization", &staging_auth)]).await.0, 200, "the old secret works during the overlap");

    // After the overlap (and the short grants' expiry), only the new ones; the old and the
    // expired are refused as unknown ones are.
    tokio::time::sleep(Duration::from_millis(4200)).await;
    assert_eq!(hit(&w, "dev", &[("authorization", &dev_auth)]).await, basic_refused, "the old password after the overlap");
    assert_eq!(hit(&w, "staging", &[("authorization", &staging_auth)]).await, jwt_refused, "the old secret after the overlap");
    assert_eq!(hit(&w, "dev", &[("authorization", &short_basic)]).await, basic_refused, "an expired grant's password");
    assert_eq!(hit(&w, "staging", &[("authorization", &short_token)]).await, jwt_refused, "an expired grant's token");
    assert_eq!(hit(&w, "dev", &[("authorization", &dev_auth2)]).await.0, 200);
    assert_eq!(hit(&w, "staging", &[("authorization", &staging_auth2)]).await.0, 200);

    // Regenerated without an overlap: the old ones stop at once.
    let (s, dev3) = v1(&w, "POST", &format!("{dev_grant}/regenerate"), None).await;
    assert_eq!(s, 200, "{dev3}");
    let (s, staging3) = v1(&w, "POST", &format!("{staging_grant}/regenerate"), Some(json!({}))).await;
    assert_eq!(s, 200, "{staging3}");
    let password3 = dev3["credentials"]["password"].as_str().unwrap().to_string();
    let secret3 = staging3["credentials"]["secret"].as_str().unwrap().to_string();
    passwords.push(password3.clone());
    secrets.push(secret3.clone());
    assert_eq!(until_refused(&w, "dev", &[("authorization", &dev_auth2)]).await, basic_refused);
    assert_eq!(until_refused(&w, "staging", &[("authorization", &staging_auth2)]).await, jwt_refused);
    until_ok(&w, "dev", &[("authorization", &basic(&dev_id, &password3))]).await;
    until_ok(&w, "staging", &[("authorization", &bearer(&token(&staging_id, &secret3)))]).await;

    // No password or secret is anywhere: the store, the logs, the dump, any answer but its
    // creation's; the store holds hashes and seeds.
    let mut everything = String::new();
    let shown = [
        "/apisix/admin/backup".to_string(),
        "/apisix/admin/consumers".to_string(),
        format!("/apisix/admin/consumers/{dev_id}/credentials"),
        format!("/apisix/admin/consumers/{staging_id}/credentials"),
        "/v1/applications".to_string(),
        "/v1/api-gateways/api/grants".to_string(),
        format!("/v1/applications/{app_id}"),
        format!("/v1/{grants}"),
        format!("/v1/{dev_grant}"),
        format!("/v1/{staging_grant}"),
    ];
    for path in &shown {
        let r = send(w.admin, "GET", path, &[("x-api-key", KEY)], None).await;
        assert_eq!(r.status, 200, "{path}");
        everything.push_str(&r.text());
    }
    let dump = common::run_weir(&["dump".as_ref(), "--config".as_ref(), w.data_dir().parent().unwrap().join("weir.yaml").as_os_str(), "--admin".as_ref(), w.admin.to_string().as_ref()], Duration::from_secs(30));
    assert!(dump.0.success(), "{}", dump.2);
    everything.push_str(&dump.1);
    everything.push_str(&w.log());
    for p in &passwords {
        assert!(!everything.contains(p.as_str()) && !everything.contains(&p[3..]), "a password was found outside its creation's answer");
    }
    for s in &secrets {
        assert!(!everything.contains(s.as_str()), "a secret was found outside its creation's answer");
    }
    assert!(everything.contains(&app_id) && everything.contains("credential_hash") && everything.contains("secret_seed"), "the check reads what it should");
    for path in [&dev_grant, &staging_grant] {
        let (s, g) = v1(&w, "GET", path, None).await;
        assert_eq!(s, 200);
        assert!(g.get("credentials").is_none() && g.get("apiKey").is_none() && g["rotatedAt"].is_string(), "{g}");
    }

    // Dev moves to key-auth: its grant's password stops there, and regenerating the grant
    // makes it an API key.
    let (s, b) = v1(&w, "PATCH", "api-gateways/api/environments/dev", Some(json!({"authType": "key-auth"}))).await;
    assert_eq!(s, 200, "{b}");
    until_refused(&w, "dev", &[("authorization", &basic(&dev_id, &password3))]).await;
    let (s, moved) = v1(&w, "POST", &format!("{dev_grant}/regenerate"), Some(json!({"overlapSeconds": 60}))).await;
    assert_eq!(s, 200, "{moved}");
    assert!(moved.get("credentials").is_none(), "{moved}");
    let key = moved["apiKey"].as_str().unwrap().to_string();
    until_ok(&w, "dev", &[("apikey", &key)]).await;
    let (_, held) = w.admin("GET", &format!("/consumers/{dev_id}/credentials"), None).await;
    let held = held.to_string();
    assert!(held.contains("key_hash") && !held.contains("credential_hash"), "no credential of the old type is left: {held}");
}
