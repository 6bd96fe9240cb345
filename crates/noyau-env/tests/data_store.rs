//! The data store with a real HTTP server on 127.0.0.1 (a few lines of
//! HTTP/1.1 below, over std's TcpListener: it counts requests, answers
//! `Range`, can break a response off half-way, and serves absolute-URI
//! requests as a forward proxy does): fetched once however many ask at
//! once, a corrupted file refused with nothing kept, a broken download
//! continued, the site's proxy used, local files hashed and copied, files
//! shown by name to a kernel, and `gc` leaving alone what is held.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use noyau_env::data::{self, DataRef, Store};
use noyau_env::index::Network;
use noyau_env::{Cache, EnvError};

#[derive(Default)]
struct Log {
    /// (request line, Range header) of every request.
    requests: Vec<(String, Option<String>)>,
}

/// Run on each request before it is answered (what another user does
/// while a download is under way).
type Hook = Arc<dyn Fn() + Send + Sync>;

/// A server of `files` (path → bytes); `break_once` paths send half of
/// their body on the first request, then close.
struct Server {
    port: u16,
    log: Arc<Mutex<Log>>,
}

impl Server {
    fn start(files: HashMap<String, Vec<u8>>, break_once: &[&str]) -> Server {
        Server::start_with(files, break_once, Arc::new(|| {}))
    }

    fn start_with(files: HashMap<String, Vec<u8>>, break_once: &[&str], hook: Hook) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Log::default()));
        let broken: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(
            break_once.iter().map(|s| s.to_string()).collect(),
        ));
        let (l2, files) = (log.clone(), Arc::new(files));
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (log, files, broken) = (l2.clone(), files.clone(), broken.clone());
                let hook = hook.clone();
                std::thread::spawn(move || serve(conn, &log, &files, &broken, &*hook));
            }
        });
        Server { port, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn requests(&self) -> Vec<(String, Option<String>)> {
        self.log.lock().unwrap().requests.clone()
    }
}

fn serve(
    conn: std::net::TcpStream,
    log: &Mutex<Log>,
    files: &HashMap<String, Vec<u8>>,
    broken: &Mutex<Vec<String>>,
    hook: &(dyn Fn() + Send + Sync),
) {
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut range = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some(v) = h
            .strip_prefix("range: ")
            .or_else(|| h.strip_prefix("Range: "))
        {
            range = Some(v.trim().to_string());
        }
    }
    log.lock()
        .unwrap()
        .requests
        .push((line.trim().to_string(), range.clone()));
    hook();
    // An absolute URI (a request to a proxy) is served by its path.
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let path = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/".into(), |i| rest[i..].to_string()),
        None => target,
    };
    let mut w = conn;
    let Some(body) = files.get(&path) else {
        let _ = w
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let from = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
        .unwrap_or(0);
    let (status, part) = if from > 0 {
        ("206 Partial Content", &body[from..])
    } else {
        ("200 OK", &body[..])
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        part.len()
    );
    let _ = w.write_all(head.as_bytes());
    let mut b = broken.lock().unwrap();
    if let Some(i) = b.iter().position(|p| *p == path) {
        b.remove(i);
        let _ = w.write_all(&part[..part.len() / 2]);
        return; // closed half-way: the client sees a short body
    }
    drop(b);
    let _ = w.write_all(part);
}

fn sha(bytes: &[u8]) -> String {
    noyau_env::sha256_hex(bytes)
}

fn quiet() -> impl FnMut(&str) {
    |_: &str| {}
}

fn store_files(root: &Path) -> Vec<String> {
    let mut out: Vec<String> = walk(root)
        .into_iter()
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .flat_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() {
                walk(&e.path())
                    .into_iter()
                    .map(|n| format!("{name}/{n}"))
                    .collect()
            } else {
                vec![name]
            }
        })
        .collect()
}

#[test]
fn ten_fetchers_at_once_make_one_request_and_share_one_verified_read_only_file() {
    let body: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let hash = sha(&body);
    let srv = Server::start(
        HashMap::from([("/d/iris.bin".to_string(), body.clone())]),
        &[],
    );
    let t = tempfile::tempdir().unwrap();
    let cache = Cache::new(t.path().join("cache"));
    // Credentials in the URL are used to fetch, never recorded.
    let url = srv
        .url("/d/iris.bin")
        .replace("http://", "http://alice:s3cret@");
    let r = DataRef::new(&url, &hash, None, t.path()).unwrap();
    let got: Vec<_> = (0..10)
        .map(|_| {
            let (r, cache) = (r.clone(), cache.clone());
            std::thread::spawn(move || data::prepare(&r, &cache, &Network::default(), &mut quiet()))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    assert_eq!(srv.requests().len(), 1, "{:?}", srv.requests());
    let f = &got[0];
    assert!(got.iter().all(|g| g == f));
    assert_eq!((f.name.as_str(), f.size), ("iris.bin", body.len() as u64));
    assert_eq!(std::fs::read(f.path()).unwrap(), body);
    assert_eq!(f.path().file_name().unwrap().to_str(), Some(hash.as_str()));
    let mode = std::fs::metadata(f.path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o444);
    let about = std::fs::read_to_string(f.path().with_extension("json")).unwrap();
    assert!(about.contains(&srv.url("/d/iris.bin")), "{about}");
    assert!(
        !about.contains("s3cret") && !f.url.contains("s3cret"),
        "{about}"
    );
    // Asked again later: from the store, no request.
    data::prepare(&r, &cache, &Network::default(), &mut quiet()).unwrap();
    assert_eq!(srv.requests().len(), 1);
}

#[test]
fn a_file_whose_hash_differs_is_refused_naming_url_and_hashes_and_nothing_is_kept() {
    let srv = Server::start(
        HashMap::from([("/x.csv".to_string(), b"corrupted".to_vec())]),
        &[],
    );
    let t = tempfile::tempdir().unwrap();
    let cache = Cache::new(t.path().join("cache"));
    let want = sha(b"the real bytes");
    let r = DataRef::new(&srv.url("/x.csv"), &want, None, t.path()).unwrap();
    let e = data::prepare(&r, &cache, &Network::default(), &mut quiet()).unwrap_err();
    match &e {
        EnvError::HashMismatch { url, expected, got } => {
            assert_eq!(url, &srv.url("/x.csv"));
            assert_eq!(expected, &want);
            assert_eq!(got.as_deref(), Some(sha(b"corrupted").as_str()));
        }
        other => panic!("{other}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains(&want) && msg.contains(&sha(b"corrupted")) && msg.contains("/x.csv"),
        "{msg}"
    );
    assert_eq!(
        store_files(&t.path().join("cache/data")),
        Vec::<String>::new()
    );
}

#[test]
fn a_download_broken_off_is_continued_with_a_range_request() {
    let body: Vec<u8> = (0..100_000u32).flat_map(|i| i.to_be_bytes()).collect();
    let hash = sha(&body);
    let srv = Server::start(
        HashMap::from([("/big".to_string(), body.clone())]),
        &["/big"],
    );
    let t = tempfile::tempdir().unwrap();
    let cache = Cache::new(t.path().join("cache"));
    let r = DataRef::new(&srv.url("/big"), &hash, Some("big.bin"), t.path()).unwrap();
    let e = data::prepare(&r, &cache, &Network::default(), &mut quiet()).unwrap_err();
    assert!(e.to_string().contains("run again to continue"), "{e}");
    let part = t.path().join(format!("cache/data/.part-{hash}"));
    let have = std::fs::metadata(&part).unwrap().len();
    assert!(have > 0 && have < body.len() as u64, "{have}");
    let mut lines = Vec::new();
    let f = data::prepare(&r, &cache, &Network::default(), &mut |l: &str| {
        lines.push(l.to_string())
    })
    .unwrap();
    assert_eq!(std::fs::read(f.path()).unwrap(), body);
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        reqs[1].1.as_deref(),
        Some(format!("bytes={have}-").as_str())
    );
    assert!(lines.iter().any(|l| l.contains("continuing")), "{lines:?}");
    assert!(!part.exists());
}

#[test]
fn the_sites_proxy_is_used_except_for_hosts_it_excludes() {
    let body = b"through the proxy".to_vec();
    let proxy = Server::start(HashMap::from([("/f".to_string(), body.clone())]), &[]);
    let direct = Server::start(HashMap::from([("/f".to_string(), body.clone())]), &[]);
    let t = tempfile::tempdir().unwrap();
    let vars: HashMap<&str, String> = HashMap::from([
        (
            "http_proxy",
            format!("http://u:pw@127.0.0.1:{}", proxy.port),
        ),
        ("no_proxy", "localhost".to_string()),
    ]);
    let net = Network::read(&|n| vars.get(n).cloned());
    let r = DataRef::new(&direct.url("/f"), &sha(&body), None, t.path()).unwrap();
    data::prepare(&r, &Cache::new(t.path().join("c1")), &net, &mut quiet()).unwrap();
    let via = proxy.requests();
    assert_eq!(via.len(), 1, "{via:?}");
    assert!(
        via[0].0.starts_with(&format!("GET {}", direct.url("/f"))),
        "{via:?}"
    );
    assert!(direct.requests().is_empty());
    assert!(!net.record().to_string().contains("pw"), "{}", net.record());

    let vars: HashMap<&str, String> = HashMap::from([
        ("http_proxy", format!("http://127.0.0.1:{}", proxy.port)),
        ("no_proxy", "127.0.0.1".to_string()),
    ]);
    let net = Network::read(&|n| vars.get(n).cloned());
    data::prepare(&r, &Cache::new(t.path().join("c2")), &net, &mut quiet()).unwrap();
    assert_eq!(proxy.requests().len(), 1);
    assert_eq!(direct.requests().len(), 1);
}

#[test]
fn local_paths_and_file_urls_are_hashed_and_copied_and_unreachable_urls_named() {
    let t = tempfile::tempdir().unwrap();
    let cache = Cache::new(t.path().join("cache"));
    std::fs::create_dir(t.path().join("nb")).unwrap();
    std::fs::write(t.path().join("nb/local.txt"), "local bytes").unwrap();
    let r = DataRef::new(
        "local.txt",
        &sha(b"local bytes"),
        None,
        &t.path().join("nb"),
    )
    .unwrap();
    let f = data::prepare(&r, &cache, &Network::default(), &mut quiet()).unwrap();
    assert_eq!(std::fs::read(f.path()).unwrap(), b"local bytes");
    let mode = std::fs::metadata(t.path().join("nb/local.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_ne!(mode & 0o200, 0, "the user's own file was made read-only");
    let url = format!("file://{}", t.path().join("nb/local.txt").display());
    let r2 = DataRef::new(&url, &sha(b"local bytes"), Some("again"), t.path()).unwrap();
    let f2 = data::prepare(&r2, &cache, &Network::default(), &mut quiet()).unwrap();
    assert_eq!((f2.path(), f2.name.as_str()), (f.path(), "again"));
    let r3 = DataRef::new(&url.replace("local", "missing"), &sha(b"x"), None, t.path()).unwrap();
    let e = data::prepare(&r3, &cache, &Network::default(), &mut quiet()).unwrap_err();
    assert!(e.to_string().contains("missing.txt"), "{e}");

    // A server that refuses: the URL and the reason.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r4 = DataRef::new(
        &format!("http://127.0.0.1:{port}/y"),
        &sha(b"y"),
        None,
        t.path(),
    )
    .unwrap();
    let e = data::prepare(&r4, &cache, &Network::default(), &mut quiet()).unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains(&format!("cannot fetch http://127.0.0.1:{port}/y")),
        "{m}"
    );
}

/// A local data file a notebook names may be one of the user's: its hash
/// is not told when it is not the declared one (a short secret's hash is
/// as good as the secret), and a FIFO or a device is refused at once, not
/// waited on nor copied without end.
#[test]
fn a_local_data_file_is_a_regular_file_and_its_other_hash_is_not_told() {
    let t = tempfile::tempdir().unwrap();
    let cache = Cache::new(t.path().join("cache"));
    std::fs::write(t.path().join("pin"), "1234").unwrap();
    let r = DataRef::new("pin", &sha(b"0000"), None, t.path()).unwrap();
    let e = data::prepare(&r, &cache, &Network::default(), &mut quiet()).unwrap_err();
    let m = e.to_string();
    assert!(
        matches!(e, EnvError::HashMismatch { got: None, .. })
            && !m.contains(&sha(b"1234"))
            && m.contains("sha256sum"),
        "{m}"
    );
    let fifo = t.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    for p in [fifo.display().to_string(), "/dev/zero".into()] {
        let r = DataRef::new(&p, &sha(b"x"), Some("x"), t.path()).unwrap();
        let e = data::prepare(&r, &cache, &Network::default(), &mut quiet()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{p}: {e}");
    }
}

#[test]
fn a_kernel_sees_its_data_files_by_name_and_gc_leaves_held_ones_alone() {
    let t = tempfile::tempdir().unwrap();
    let cache = Cache::new(t.path().join("cache"));
    std::fs::write(t.path().join("a"), "aaa").unwrap();
    std::fs::write(t.path().join("b"), "bbb").unwrap();
    let fa = data::prepare(
        &DataRef::new("a", &sha(b"aaa"), Some("first.txt"), t.path()).unwrap(),
        &cache,
        &Network::default(),
        &mut quiet(),
    )
    .unwrap();
    let fb = data::prepare(
        &DataRef::new("b", &sha(b"bbb"), None, t.path()).unwrap(),
        &cache,
        &Network::default(),
        &mut quiet(),
    )
    .unwrap();
    let rt = t.path().join("rt");
    std::fs::create_dir(&rt).unwrap();
    let r = noyau_env::Realised::plain(vec![fa.clone()]).unwrap();
    let (_, env) = r
        .command(&["python3".into()], &Default::default(), &rt)
        .unwrap();
    let dir = Path::new(&env["NOYAU_DATA"]);
    assert_eq!(dir, rt.join("data"));
    assert_eq!(
        std::fs::read_to_string(dir.join("first.txt")).unwrap(),
        "aaa"
    );
    assert_eq!(
        std::fs::read_link(dir.join("first.txt")).unwrap(),
        fa.path()
    );

    // Both unused for long (their lock files' mtime is the last use); `a`
    // is held by the kernel above.
    let old = std::time::SystemTime::now() - Duration::from_secs(40 * 86400);
    for f in [&fa, &fb] {
        let lock = f.store.join(format!("{}.lock", f.sha256));
        std::fs::File::options()
            .write(true)
            .open(&lock)
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
    let dry = noyau_env::manage::gc(&cache, Duration::from_secs(30 * 86400), true).unwrap();
    assert_eq!(dry.removed.len(), 1, "{dry:?}");
    assert!(fb.path().exists());
    let done = noyau_env::manage::gc(&cache, Duration::from_secs(30 * 86400), false).unwrap();
    assert_eq!(done.removed.len(), 1, "{done:?}");
    assert!(
        done.removed[0].0.contains(&fb.sha256) && done.in_use[0].contains(&fa.sha256),
        "{done:?}"
    );
    assert!(!fb.path().exists() && fa.path().exists());
    drop(r);
    let done = noyau_env::manage::gc(&cache, Duration::from_secs(0), false).unwrap();
    assert_eq!(done.removed.len(), 1, "{done:?}");
    assert!(!fa.path().exists());
    assert!(Store::of(&cache)
        .find(&fa.sha256, "x", "a")
        .unwrap()
        .is_none());
}

/// What another user who may write a team's cache plants there: links at
/// the names noyau writes, to a file of the victim's.
fn plant_link(at: &Path, to: &Path) {
    let _ = std::fs::remove_file(at);
    std::os::unix::fs::symlink(to, at).unwrap();
}

#[test]
fn links_planted_at_the_part_and_the_description_while_fetching_are_never_written_through() {
    let body = b"the attacker's server's bytes".to_vec();
    let hash = sha(&body);
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("cache/data");
    let victim = t.path().join("authorized_keys");
    let victim2 = t.path().join("bashrc");
    std::fs::write(&victim, "the victim's keys").unwrap();
    std::fs::write(&victim2, "the victim's rc").unwrap();
    // Before the request: a link at the part's name.
    std::fs::create_dir_all(store.join("sha256")).unwrap();
    plant_link(&store.join(format!(".part-{hash}")), &victim);
    // While the request is answered: links at the part and the description.
    let (s2, h2, v, v2) = (store.clone(), hash.clone(), victim.clone(), victim2.clone());
    let srv = Server::start_with(
        HashMap::from([("/f".to_string(), body.clone())]),
        &[],
        Arc::new(move || {
            plant_link(&s2.join(format!(".part-{h2}")), &v);
            plant_link(&s2.join(format!("sha256/{h2}.json")), &v2);
        }),
    );
    let cache = Cache::new(t.path().join("cache"));
    let r = DataRef::new(&srv.url("/f"), &hash, None, t.path()).unwrap();
    let got = data::prepare(&r, &cache, &Network::default(), &mut quiet());
    let unchanged = |p: &Path, text: &str| {
        assert_eq!(std::fs::read_to_string(p).unwrap(), text);
        let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_ne!(mode & 0o200, 0, "{} was made read-only", p.display());
    };
    unchanged(&victim, "the victim's keys");
    unchanged(&victim2, "the victim's rc");
    // The part swapped during the download: refused, nothing stored.
    let e = got.unwrap_err().to_string();
    assert!(e.contains("replaced by something else"), "{e}");
    assert!(std::fs::symlink_metadata(store.join(format!("sha256/{hash}"))).is_err());

    // Without the swap of the part, the description's link is replaced by
    // a file of ours and the fetch completes.
    let (s3, h3, v2) = (store.clone(), hash.clone(), victim2.clone());
    let srv = Server::start_with(
        HashMap::from([("/f".to_string(), body.clone())]),
        &[],
        Arc::new(move || plant_link(&s3.join(format!("sha256/{h3}.json")), &v2)),
    );
    let r = DataRef::new(&srv.url("/f"), &hash, None, t.path()).unwrap();
    let f = data::prepare(&r, &cache, &Network::default(), &mut quiet()).unwrap();
    assert_eq!(std::fs::read(f.path()).unwrap(), body);
    unchanged(&victim2, "the victim's rc");
    let json = f.path().with_extension("json");
    assert!(std::fs::symlink_metadata(&json).unwrap().is_file());
}

#[test]
fn a_file_renamed_under_another_hash_or_a_linked_store_is_not_used() {
    let t = tempfile::tempdir().unwrap();
    let cache = Cache::new(t.path().join("cache"));
    for (n, text) in [("a", "aaa"), ("b", "bbbb")] {
        std::fs::write(t.path().join(n), text).unwrap();
    }
    let (ha, hb) = (sha(b"aaa"), sha(b"bbbb"));
    for (n, h) in [("a", &ha), ("b", &hb)] {
        let r = DataRef::new(n, h, None, t.path()).unwrap();
        data::prepare(&r, &cache, &Network::default(), &mut quiet()).unwrap();
    }
    // Someone who may write the store renames a's file and description
    // to b's names.
    let dir = t.path().join("cache/data/sha256");
    let b_about = std::fs::read(dir.join(format!("{hb}.json"))).unwrap();
    for ext in ["", ".json"] {
        std::fs::rename(
            dir.join(format!("{ha}{ext}")),
            dir.join(format!("{hb}{ext}")),
        )
        .unwrap();
    }
    let e = Store::of(&cache)
        .find(&hb, "b", "b")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("described as another file") && e.contains(&ha),
        "{e}"
    );
    // With b's own description back, a's file under b's name: its size
    // is not b's.
    std::fs::remove_file(dir.join(format!("{hb}.json"))).unwrap();
    std::fs::write(dir.join(format!("{hb}.json")), &b_about).unwrap();
    let e = Store::of(&cache)
        .find(&hb, "b", "b")
        .unwrap_err()
        .to_string();
    assert!(e.contains("described as another file"), "{e}");
}

/// `data::prepare` into `cache`, with the lines it says.
fn prepare_saying(r: &DataRef, cache: &Cache) -> (Result<data::DataFile, EnvError>, Vec<String>) {
    let mut lines = Vec::new();
    let got = data::prepare(r, cache, &Network::default(), &mut |l: &str| {
        lines.push(l.to_string())
    });
    (got, lines)
}

/// The only test here that sets `XDG_CACHE_HOME` (the user's own cache).
#[test]
fn a_store_that_is_a_link_or_another_members_is_not_used_and_the_file_is_fetched_into_ones_own() {
    let t = tempfile::tempdir().unwrap();
    let own = t.path().join("home-cache");
    std::env::set_var("XDG_CACHE_HOME", &own);
    let own_store = own.join("noyau/envs/data");
    std::fs::write(t.path().join("a"), "aaa").unwrap();
    let r = DataRef::new("a", &sha(b"aaa"), None, t.path()).unwrap();

    // A store that is a link (to a directory of the victim's): refused,
    // nothing written there, the file fetched into the user's own cache.
    let other = t.path().join("elsewhere");
    std::fs::create_dir(&other).unwrap();
    std::fs::create_dir(t.path().join("c2")).unwrap();
    std::os::unix::fs::symlink(&other, t.path().join("c2/data")).unwrap();
    let (got, lines) = prepare_saying(&r, &Cache::new(t.path().join("c2")));
    let f = got.unwrap();
    assert!(f.path().starts_with(&own_store), "{f:?}");
    assert_eq!(std::fs::read(f.path()).unwrap(), b"aaa");
    assert!(
        lines.iter().any(|l| l
            .contains("not using the shared cache's data store")
            && l.contains("symlink")),
        "{lines:?}"
    );
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 0);

    // A team's cache (group-writable) whose `data/` another member made:
    // the same, and their directory is left as it was.
    if !noyau_trust::testing::root() {
        return;
    }
    std::fs::remove_dir_all(&own).unwrap();
    let team = t.path().join("team");
    std::fs::create_dir_all(team.join("data/sha256")).unwrap();
    std::fs::set_permissions(&team, std::fs::Permissions::from_mode(0o2775)).unwrap();
    for d in ["data", "data/sha256"] {
        std::os::unix::fs::chown(team.join(d), Some(65534), Some(65534)).unwrap();
    }
    let (got, lines) = prepare_saying(&r, &Cache::new(&team));
    let f = got.unwrap();
    assert!(f.path().starts_with(&own_store), "{f:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("not using the shared cache's data store")
                && l.contains("uid 65534")),
        "{lines:?}"
    );
    assert_eq!(walk(&team.join("data")), Vec::<String>::new());
}

#[test]
fn a_part_under_a_random_name_is_removed_when_the_file_cannot_be_stored() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("a"), "aaa").unwrap();
    let hash = sha(b"aaa");
    let store = t.path().join("cache/data");
    // Something at the part's name that is not a file and cannot be
    // removed as one: the download goes to a file under a random name.
    std::fs::create_dir_all(store.join(format!(".part-{hash}/x"))).unwrap();
    // And the description cannot be renamed in (a directory there).
    std::fs::create_dir_all(store.join(format!("sha256/{hash}.json/x"))).unwrap();
    let r = DataRef::new("a", &hash, None, t.path()).unwrap();
    let cache = Cache::new(t.path().join("cache"));
    let e = Store::of(&cache)
        .fetch(&r, &Network::default(), &mut quiet())
        .unwrap_err();
    assert!(e.to_string().contains(".json"), "{e}");
    let left: Vec<String> = std::fs::read_dir(&store)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".part-{hash}.")))
        .collect();
    assert_eq!(left, Vec::<String>::new());
}

#[test]
fn a_part_of_another_users_or_with_another_name_is_started_over_not_written() {
    let body: Vec<u8> = (0..50_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let hash = sha(&body);
    let srv = Server::start(HashMap::from([("/f".to_string(), body.clone())]), &[]);
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("cache/data");
    std::fs::create_dir_all(store.join("sha256")).unwrap();
    let part = store.join(format!(".part-{hash}"));
    // A hard link to a file of the victim's: continuing it would append
    // the download to that file.
    let victim = t.path().join("victim");
    std::fs::write(&victim, "the victim's file").unwrap();
    std::fs::hard_link(&victim, &part).unwrap();
    let cache = Cache::new(t.path().join("cache"));
    let r = DataRef::new(&srv.url("/f"), &hash, None, t.path()).unwrap();
    let f = data::prepare(&r, &cache, &Network::default(), &mut quiet()).unwrap();
    assert_eq!(std::fs::read(f.path()).unwrap(), body);
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "the victim's file"
    );
    assert_eq!(srv.requests()[0].1, None, "{:?}", srv.requests());

    // Another user's part (bytes of their choosing) is not continued.
    if !noyau_trust::testing::root() {
        return;
    }
    std::fs::write(&part, &body[..1000]).unwrap();
    std::os::unix::fs::chown(&part, Some(65534), Some(65534)).unwrap();
    let r = DataRef::new(&srv.url("/f"), &hash, Some("again"), t.path()).unwrap();
    let c2 = Cache::new(t.path().join("cache"));
    std::fs::remove_file(f.path()).unwrap();
    data::prepare(&r, &c2, &Network::default(), &mut quiet()).unwrap();
    let reqs = srv.requests();
    assert_eq!((reqs.len(), &reqs[1].1), (2, &None), "{reqs:?}");
}
