//! A notebook file: parsed, written back as nbformat does, parsed again;
//! the second write must equal the first (nothing lost or changed on a
//! round trip).
#![no_main]

use libfuzzer_sys::fuzz_target;
use noyau_notebook::Notebook;

fuzz_target!(|data: &[u8]| {
    let Ok(mut nb) = Notebook::from_slice(data) else {
        return;
    };
    let _ = (nb.language(), nb.kernel_name());
    let first = nb.to_json_string();
    let back = Notebook::from_json_str(&first).expect("what we write reads back");
    assert_eq!(back.to_json_string(), first);
    nb.upgrade_minor();
    let _ = nb.to_json_string();
});
