//! The site's look: its name, logo and message of the day from hub.toml,
//! and the hub's own stylesheet and script. Everything a page uses is
//! served by the hub itself (nothing is fetched from elsewhere at run
//! time): the stylesheet and script are compiled in, the logo is read
//! once at start.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

use crate::auth::sha256_hex;
use crate::config::HubConfig;

const CSS: &str = include_str!("../static/hub.css");
const JS: &str = include_str!("../static/hub.js");
/// A logo larger than this is refused at start (it is sent with every page).
const LOGO_MAX: u64 = 256 * 1024;

/// What every page shows of the site.
pub struct Site {
    pub name: String,
    /// The message of the day's paragraphs.
    pub motd: Vec<String>,
    logo: Option<(Vec<u8>, &'static str)>,
    /// The stylesheet's and script's URLs: a hash of their content in the
    /// query, so that browsers may keep them (a new hub, a new URL).
    pub css_url: String,
    pub js_url: String,
}

impl Site {
    pub fn load(cfg: &HubConfig) -> anyhow::Result<Site> {
        let logo = match &cfg.logo {
            Some(p) => Some(read_logo(p).with_context(|| format!("logo = {:?}", p.display()))?),
            None => None,
        };
        let motd = cfg
            .motd
            .as_deref()
            .unwrap_or_default()
            .split("\n\n")
            .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|p| !p.is_empty())
            .collect();
        Ok(Site {
            name: cfg.site_name.trim().to_string(),
            motd,
            logo,
            css_url: format!("/hub/static/hub.css?v={}", &sha256_hex(CSS)[..12]),
            js_url: format!("/hub/static/hub.js?v={}", &sha256_hex(JS)[..12]),
        })
    }

    pub fn has_logo(&self) -> bool {
        self.logo.is_some()
    }

    /// GET /hub/logo.
    pub fn logo(&self) -> Response {
        match &self.logo {
            Some((bytes, kind)) => asset(kind, bytes.clone()),
            None => axum::http::StatusCode::NOT_FOUND.into_response(),
        }
    }
}

/// GET /hub/static/hub.css.
pub fn css() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

/// GET /hub/static/hub.js.
pub fn js() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}

fn asset(kind: &'static str, body: impl Into<axum::body::Body>) -> Response {
    let mut r = body.into().into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // An SVG opened on its own runs no script and loads nothing.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    r
}

/// The logo's bytes and type: a regular file (not followed through a
/// symlink), at most [`LOGO_MAX`], whose content is the image its name says.
fn read_logo(path: &Path) -> anyhow::Result<(Vec<u8>, &'static str)> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let kind = match ext.as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("svg") => "image/svg+xml",
        _ => bail!("the logo must be a .png, .jpg, .gif, .webp or .svg file"),
    };
    // The admin's file, whoever owns it (root, the hub's account).
    let f = noyau_trust::Expect::file()
        .owner(noyau_trust::Owner::Any)
        .mode(noyau_trust::Mode::Any)
        .open(path)
        .context("give the file's own path, a regular file")?;
    let meta = f.metadata()?;
    if meta.len() > LOGO_MAX {
        bail!(
            "it has {} bytes; a logo is sent with every page: make it at most {LOGO_MAX}",
            meta.len()
        );
    }
    let mut bytes = Vec::new();
    f.take(LOGO_MAX + 1).read_to_end(&mut bytes)?;
    let looks_right = match kind {
        "image/png" => bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "image/jpeg" => bytes.starts_with(b"\xff\xd8\xff"),
        "image/gif" => bytes.starts_with(b"GIF8"),
        "image/webp" => bytes.len() > 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP",
        _ => std::str::from_utf8(&bytes).is_ok_and(|t| t.contains("<svg")),
    };
    if !looks_right {
        bail!("its content is not the {kind} image its name says");
    }
    Ok((bytes, kind))
}

#[cfg(test)]
mod tests {
    use super::read_logo;

    #[test]
    fn a_logo_is_a_small_regular_image_file() {
        let dir = std::env::temp_dir().join(format!("noyau-hub-logo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let svg = dir.join("logo.svg");
        std::fs::write(&svg, "<svg xmlns=\"http://www.w3.org/2000/svg\"/>").unwrap();
        assert_eq!(read_logo(&svg).unwrap().1, "image/svg+xml");
        let fake = dir.join("logo.png");
        std::fs::write(&fake, "<svg/>").unwrap();
        let e = read_logo(&fake).unwrap_err().to_string();
        assert!(e.contains("not the image/png"), "{e}");
        let big = dir.join("big.svg");
        std::fs::write(&big, format!("<svg>{}</svg>", " ".repeat(300 * 1024))).unwrap();
        assert!(read_logo(&big).unwrap_err().to_string().contains("at most"));
        let link = dir.join("link.svg");
        std::os::unix::fs::symlink(&svg, &link).unwrap();
        assert!(read_logo(&link).is_err());
        assert!(read_logo(&dir.join("logo.txt")).is_err());
        assert!(read_logo(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
