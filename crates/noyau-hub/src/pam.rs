//! PAM, opened at run time: the hub `dlopen`s the system's `libpam.so.0`
//! instead of linking it, so that noyau builds without libpam's headers
//! (no `-dev` package) and one binary runs on every Linux, with or without
//! PAM. Five functions are all a password check needs: `pam_start`,
//! `pam_authenticate`, `pam_acct_mgmt`, `pam_end` and `pam_strerror`, plus
//! the conversation callback that answers PAM's prompts.
//!
//! This module holds all of the hub's unsafe code. The library is opened
//! once (at the hub's start, so that a host without PAM is refused then and
//! not at the first login) and never closed. The password lives in one
//! NUL-terminated buffer that is zeroed when the check ends; the copies
//! handed to PAM are PAM's to wipe and free (Linux-PAM overwrites replies
//! before freeing them), and those the conversation drops on an error are
//! zeroed here before `free`.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::marker::PhantomData;
use std::sync::OnceLock;

/// The Linux-PAM library, by its soname (present wherever PAM is: no
/// `libpam.so` development link needed).
const LIBRARY: &CStr = c"libpam.so.0";

// Linux-PAM's constants (security/_pam_types.h).
const PAM_SUCCESS: c_int = 0;
const PAM_BUF_ERR: c_int = 5;
const PAM_CONV_ERR: c_int = 19;
const PAM_PROMPT_ECHO_OFF: c_int = 1;
const PAM_PROMPT_ECHO_ON: c_int = 2;
const PAM_ERROR_MSG: c_int = 3;
const PAM_TEXT_INFO: c_int = 4;
const PAM_SILENT: c_int = 0x8000;
const PAM_DISALLOW_NULL_AUTHTOK: c_int = 0x0001;
/// The most messages one conversation call may carry.
const PAM_MAX_NUM_MSG: c_int = 32;
/// `pam_set_item`'s item: the remote host the login comes from.
const PAM_RHOST: c_int = 4;

#[repr(C)]
struct PamMessage {
    msg_style: c_int,
    msg: *const c_char,
}

#[repr(C)]
struct PamResponse {
    resp: *mut c_char,
    resp_retcode: c_int,
}

type ConvFn = unsafe extern "C" fn(
    c_int,
    *mut *const PamMessage,
    *mut *mut PamResponse,
    *mut c_void,
) -> c_int;

#[repr(C)]
struct PamConv {
    conv: ConvFn,
    appdata_ptr: *mut c_void,
}

/// `pam_handle_t`, opaque.
#[repr(C)]
struct PamHandle {
    _private: [u8; 0],
}

type StartFn = unsafe extern "C" fn(
    *const c_char,
    *const c_char,
    *const PamConv,
    *mut *mut PamHandle,
) -> c_int;
/// `pam_authenticate`, `pam_acct_mgmt` and `pam_end` share this shape.
type HandleFn = unsafe extern "C" fn(*mut PamHandle, c_int) -> c_int;
type SetItemFn = unsafe extern "C" fn(*mut PamHandle, c_int, *const c_void) -> c_int;
type StrerrorFn = unsafe extern "C" fn(*mut PamHandle, c_int) -> *const c_char;

#[derive(Debug, thiserror::Error)]
pub enum PamError {
    #[error(
        "cannot use the system's PAM library: {0}. The hub's PAM login needs it \
         (Debian, Ubuntu: package libpam0g; RHEL, Rocky, SUSE: package pam); install it, \
         or log users in through an SSO proxy with auth = \"header\" in hub.toml"
    )]
    Unavailable(String),
    #[error("PAM service {service}: {message}")]
    Start { service: String, message: String },
    #[error("{0}")]
    Refused(String),
    #[error("the user name, password or PAM service holds a NUL byte")]
    Nul,
}

/// The entry points found in the library.
#[derive(Clone, Copy)]
struct Library {
    start: StartFn,
    authenticate: HandleFn,
    acct_mgmt: HandleFn,
    end: HandleFn,
    strerror: StrerrorFn,
    set_item: SetItemFn,
}

static LOADED: OnceLock<Result<Library, String>> = OnceLock::new();

/// Opens the system's PAM library (once per process): the hub calls this
/// at start in PAM mode, so a host without it is refused at once.
pub fn load() -> Result<(), PamError> {
    library().map(|_| ())
}

fn library() -> Result<&'static Library, PamError> {
    LOADED
        .get_or_init(|| Library::open(LIBRARY))
        .as_ref()
        .map_err(|why| PamError::Unavailable(why.clone()))
}

/// The last `dlerror()` of this thread, or `fallback`.
fn dl_error(fallback: &str) -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string owned by the
    // loader and valid until the next dl* call on this thread; it is copied
    // at once.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        return fallback.to_string();
    }
    // SAFETY: non-NULL, NUL-terminated (see above).
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

impl Library {
    fn open(name: &CStr) -> Result<Library, String> {
        // SAFETY: `name` is NUL-terminated. Loading runs libpam's (and its
        // dependencies') initialisers, which expect nothing of the caller.
        // The handle is never closed, so the function pointers below stay
        // valid for the life of the process.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(dl_error(&format!("{} not found", name.to_string_lossy())));
        }
        // SAFETY: each type is the C prototype of that symbol in Linux-PAM's
        // <security/pam_appl.h> (pam_start, pam_authenticate, pam_acct_mgmt,
        // pam_end, pam_strerror, pam_set_item), with the structures laid
        // out #[repr(C)].
        unsafe {
            Ok(Library {
                start: symbol(handle, c"pam_start")?,
                authenticate: symbol(handle, c"pam_authenticate")?,
                acct_mgmt: symbol(handle, c"pam_acct_mgmt")?,
                end: symbol(handle, c"pam_end")?,
                strerror: symbol(handle, c"pam_strerror")?,
                set_item: symbol(handle, c"pam_set_item")?,
            })
        }
    }

    /// PAM's text for a status code.
    fn message(&self, handle: *mut PamHandle, code: c_int) -> String {
        // SAFETY: pam_strerror takes any code and a handle from pam_start (or
        // NULL, which Linux-PAM ignores); it returns a static string or NULL.
        let p = unsafe { (self.strerror)(handle, code) };
        if p.is_null() {
            return format!("PAM error {code}");
        }
        // SAFETY: non-NULL and NUL-terminated (a static string of libpam).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// A function pointer of type `F` to `name` in `handle`.
///
/// # Safety
/// `F` must be an `extern "C" fn` type matching the symbol's C prototype.
unsafe fn symbol<F: Copy>(handle: *mut c_void, name: &CStr) -> Result<F, String> {
    const { assert!(size_of::<F>() == size_of::<*mut c_void>()) };
    // SAFETY: `handle` came from dlopen and is never closed; `name` is
    // NUL-terminated.
    let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
    if p.is_null() {
        return Err(dl_error(&format!(
            "no {} in libpam",
            name.to_string_lossy()
        )));
    }
    // SAFETY: a non-NULL code address of the size of `F`, which the caller
    // vouches is the symbol's prototype.
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
}

/// A NUL-terminated copy of the password, zeroed when dropped.
struct Secret(Vec<u8>);

impl Secret {
    fn new(password: &str) -> Result<Secret, PamError> {
        if password.as_bytes().contains(&0) {
            return Err(PamError::Nul);
        }
        let mut v = Vec::with_capacity(password.len() + 1);
        v.extend_from_slice(password.as_bytes());
        v.push(0);
        Ok(Secret(v))
    }

    fn as_cstr(&self) -> &CStr {
        CStr::from_bytes_with_nul(&self.0).expect("one NUL, at the end")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned &mut u8; a volatile write is
            // not removed as a dead store before the buffer is freed.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// What the conversation answers with: the appdata PAM hands back to it.
struct Credentials<'a> {
    user: &'a CStr,
    password: &'a Secret,
}

/// Checks `user`'s `password` with the PAM `service` (authentication, then
/// the account's validity: expired or locked accounts are refused), for a
/// login from `rhost` (`PAM_RHOST`: pam_faillock, pam_access and the
/// auth log, hence fail2ban, see where it comes from). Blocks (PAM modules
/// sleep after a failure): call it off the async threads.
pub fn authenticate(
    service: &str,
    user: &str,
    password: &str,
    rhost: &str,
) -> Result<(), PamError> {
    let lib = library()?;
    let service_c = CString::new(service).map_err(|_| PamError::Nul)?;
    let user_c = CString::new(user).map_err(|_| PamError::Nul)?;
    let rhost_c = CString::new(rhost).map_err(|_| PamError::Nul)?;
    let secret = Secret::new(password)?;
    let creds = Credentials {
        user: &user_c,
        password: &secret,
    };
    let conv = PamConv {
        conv: converse,
        appdata_ptr: &creds as *const Credentials as *mut c_void,
    };
    let mut handle: *mut PamHandle = std::ptr::null_mut();
    // SAFETY: NUL-terminated strings and a conversation whose appdata
    // (`creds`) outlives the handle: `Transaction` ends it (pam_end) before
    // `creds` is dropped, being declared after it.
    let rc = unsafe { (lib.start)(service_c.as_ptr(), user_c.as_ptr(), &conv, &mut handle) };
    if rc != PAM_SUCCESS || handle.is_null() {
        return Err(PamError::Start {
            service: service.to_string(),
            message: lib.message(handle, rc),
        });
    }
    let mut t = Transaction {
        lib,
        handle,
        status: PAM_SUCCESS,
        _creds: PhantomData,
    };
    // SAFETY: a live handle; PAM copies the NUL-terminated string.
    t.status = unsafe { (lib.set_item)(handle, PAM_RHOST, rhost_c.as_ptr().cast()) };
    if t.status != PAM_SUCCESS {
        return Err(PamError::Refused(lib.message(handle, t.status)));
    }
    t.step(lib.authenticate, PAM_SILENT | PAM_DISALLOW_NULL_AUTHTOK)?;
    t.step(lib.acct_mgmt, PAM_SILENT)
}

/// A started PAM transaction, ended (`pam_end` with the last status) when
/// dropped.
struct Transaction<'a> {
    lib: &'static Library,
    handle: *mut PamHandle,
    status: c_int,
    _creds: PhantomData<&'a Credentials<'a>>,
}

impl Transaction<'_> {
    fn step(&mut self, f: HandleFn, flags: c_int) -> Result<(), PamError> {
        // SAFETY: a live handle from pam_start, used by this thread only.
        self.status = unsafe { f(self.handle, flags) };
        if self.status == PAM_SUCCESS {
            Ok(())
        } else {
            Err(PamError::Refused(
                self.lib.message(self.handle, self.status),
            ))
        }
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        // SAFETY: the handle is live and ended exactly once, here.
        unsafe { (self.lib.end)(self.handle, self.status) };
    }
}

/// PAM's conversation: the password answers a hidden prompt, the user name
/// a visible one (a module asking who logs in); errors and notices are
/// logged and need no answer; any other kind of message (Linux-PAM's radio
/// and binary prompts) fails the conversation, as a web form has nothing to
/// answer it with. The reply array and its strings are malloc'd: PAM frees
/// them.
unsafe extern "C" fn converse(
    num_msg: c_int,
    msg: *mut *const PamMessage,
    resp: *mut *mut PamResponse,
    appdata: *mut c_void,
) -> c_int {
    if !(1..=PAM_MAX_NUM_MSG).contains(&num_msg)
        || msg.is_null()
        || resp.is_null()
        || appdata.is_null()
    {
        return PAM_CONV_ERR;
    }
    let n = num_msg as usize;
    // SAFETY: appdata is the `Credentials` that `authenticate` gave
    // pam_start, alive until pam_end.
    let creds = unsafe { &*(appdata as *const Credentials) };
    // SAFETY: calloc of n zeroed replies (NULL strings), as PAM expects an
    // array it frees with free().
    let replies = unsafe { libc::calloc(n, size_of::<PamResponse>()) } as *mut PamResponse;
    if replies.is_null() {
        return PAM_BUF_ERR;
    }
    for i in 0..n {
        // SAFETY: Linux-PAM passes an array of num_msg pointers to messages.
        let m = unsafe { &**msg.add(i) };
        let answer = match m.msg_style {
            PAM_PROMPT_ECHO_OFF => creds.password.as_cstr(),
            PAM_PROMPT_ECHO_ON => creds.user,
            PAM_ERROR_MSG | PAM_TEXT_INFO => {
                if !m.msg.is_null() {
                    // SAFETY: a NUL-terminated string of the module's.
                    let text = unsafe { CStr::from_ptr(m.msg) };
                    tracing::info!(user = ?creds.user, "PAM says: {}", text.to_string_lossy());
                }
                continue;
            }
            other => {
                tracing::warn!(
                    "PAM asked a question of kind {other}, which a login form cannot answer"
                );
                // SAFETY: the first i replies are ours (calloc'd above).
                unsafe { free_replies(replies, i) };
                return PAM_CONV_ERR;
            }
        };
        // SAFETY: strdup of a NUL-terminated string; PAM frees the copy.
        let copy = unsafe { libc::strdup(answer.as_ptr()) };
        if copy.is_null() {
            // SAFETY: as above.
            unsafe { free_replies(replies, i) };
            return PAM_BUF_ERR;
        }
        // SAFETY: i < n, inside the calloc'd array.
        unsafe { (*replies.add(i)).resp = copy };
    }
    // SAFETY: `resp` is PAM's out-pointer, checked non-NULL.
    unsafe { *resp = replies };
    PAM_SUCCESS
}

/// Frees the first `count` replies' strings (zeroed first: one may be the
/// password) and the array.
///
/// # Safety
/// `replies` is a calloc'd array of at least `count` replies whose strings
/// are NULL or malloc'd.
unsafe fn free_replies(replies: *mut PamResponse, count: usize) {
    for i in 0..count {
        // SAFETY: inside the array (caller's contract).
        let r = unsafe { &mut *replies.add(i) };
        if !r.resp.is_null() {
            // SAFETY: a malloc'd NUL-terminated string of ours: zeroed over
            // its length, then freed once.
            unsafe {
                let len = libc::strlen(r.resp);
                std::ptr::write_bytes(r.resp, 0, len);
                libc::free(r.resp.cast());
            }
            r.resp = std::ptr::null_mut();
        }
    }
    // SAFETY: the array itself came from calloc.
    unsafe { libc::free(replies.cast()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the conversation on `styles`, returns its status and answers.
    fn converse_with(styles: &[c_int]) -> (c_int, Vec<Option<String>>) {
        let user = CString::new("alice").unwrap();
        let password = Secret::new("s3cret").unwrap();
        let creds = Credentials {
            user: &user,
            password: &password,
        };
        let text = c"a notice";
        let msgs: Vec<PamMessage> = styles
            .iter()
            .map(|&s| PamMessage {
                msg_style: s,
                msg: text.as_ptr(),
            })
            .collect();
        let mut ptrs: Vec<*const PamMessage> = msgs.iter().map(|m| m as *const _).collect();
        let mut resp: *mut PamResponse = std::ptr::null_mut();
        // SAFETY: the test plays PAM: an array of message pointers, an
        // out-pointer, and the Credentials as appdata.
        let rc = unsafe {
            converse(
                styles.len() as c_int,
                ptrs.as_mut_ptr(),
                &mut resp,
                &creds as *const Credentials as *mut c_void,
            )
        };
        if rc != PAM_SUCCESS {
            assert!(resp.is_null(), "no replies handed over on failure");
            return (rc, Vec::new());
        }
        let answers = (0..styles.len())
            .map(|i| {
                // SAFETY: the conversation returned `styles.len()` replies.
                let r = unsafe { &*resp.add(i) };
                // SAFETY: NULL or a NUL-terminated malloc'd string.
                (!r.resp.is_null()).then(|| {
                    unsafe { CStr::from_ptr(r.resp) }
                        .to_string_lossy()
                        .into_owned()
                })
            })
            .collect();
        // SAFETY: what the conversation allocated, freed as PAM would.
        unsafe { free_replies(resp, styles.len()) };
        (rc, answers)
    }

    #[test]
    fn the_conversation_answers_each_prompt() {
        let (rc, answers) = converse_with(&[
            PAM_TEXT_INFO,
            PAM_PROMPT_ECHO_ON,
            PAM_ERROR_MSG,
            PAM_PROMPT_ECHO_OFF,
        ]);
        assert_eq!(rc, PAM_SUCCESS);
        assert_eq!(
            answers,
            [None, Some("alice".into()), None, Some("s3cret".into())]
        );
    }

    #[test]
    fn the_conversation_fails_on_what_a_form_cannot_answer() {
        // PAM_BINARY_PROMPT (7) after a password prompt: the password's copy
        // is freed by the conversation, nothing is handed over.
        assert_eq!(converse_with(&[PAM_PROMPT_ECHO_OFF, 7]).0, PAM_CONV_ERR);
        assert_eq!(converse_with(&[]).0, PAM_CONV_ERR);
    }

    #[test]
    fn a_missing_library_is_reported_by_name() {
        let Err(why) = Library::open(c"libnoyau-no-such-pam.so.0") else {
            panic!("a library that does not exist was opened");
        };
        assert!(why.contains("libnoyau-no-such-pam.so.0"), "{why}");
        let msg = PamError::Unavailable(why).to_string();
        assert!(msg.contains("auth = \"header\""), "{msg}");
    }

    #[test]
    fn nul_bytes_are_refused_before_pam() {
        assert!(matches!(Secret::new("a\0b"), Err(PamError::Nul)));
        assert!(matches!(
            authenticate("login", "al\0ice", "x", "192.0.2.1"),
            Err(PamError::Nul) | Err(PamError::Unavailable(_))
        ));
    }

    /// The real libpam (Debian's libpam0g is essential, so always there):
    /// an unknown user of an unknown service is refused, not a panic.
    #[test]
    fn the_system_pam_refuses_an_unknown_user() {
        load().expect("libpam.so.0 on this host");
        let r = authenticate(
            "noyau-test-no-such-service",
            "noyau-no-such-user",
            "x",
            "192.0.2.1",
        );
        assert!(
            matches!(r, Err(PamError::Refused(_)) | Err(PamError::Start { .. })),
            "{r:?}"
        );
    }

    /// PAM's modules see where the login comes from: a service of the
    /// test's own whose pam_exec writes `PAM_RHOST`, then denies.
    #[test]
    #[ignore = "needs root: writes a PAM service in /etc/pam.d"]
    fn pam_modules_see_the_client_address() {
        let tag = format!("noyau-hub-rhost-test-{}", std::process::id());
        let dir = std::env::temp_dir().join(&tag);
        std::fs::create_dir_all(&dir).unwrap();
        let (script, seen) = (dir.join("rhost"), dir.join("seen"));
        std::fs::write(
            &script,
            format!("#!/bin/sh\necho \"$PAM_RHOST\" > {}\n", seen.display()),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let service = std::path::Path::new("/etc/pam.d").join(&tag);
        std::fs::write(
            &service,
            format!(
                "auth required pam_exec.so quiet {}\nauth requisite pam_deny.so\n",
                script.display()
            ),
        )
        .unwrap();
        let r = authenticate(&tag, "root", "x", "192.0.2.7");
        let _ = std::fs::remove_file(&service);
        assert!(matches!(r, Err(PamError::Refused(_))), "{r:?}");
        let seen = std::fs::read_to_string(&seen).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(seen.trim(), "192.0.2.7");
    }
}
