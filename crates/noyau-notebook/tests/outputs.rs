use noyau_notebook::outputs::{apply_backspace, apply_carriage_return};
use noyau_notebook::{Cell, Notebook, OutputBuilder, OutputError, OutputEvent, StreamMode};
use serde_json::{json, Value};

/// Messages and the outputs nbclient 0.11 built from them with its
/// `process_message` (record_timing off, coalesce_streams off).
const NBCLIENT: &str = include_str!("data/nbclient_outputs.json");

fn two_cells() -> Notebook {
    let mut nb = Notebook::new();
    nb.cells.push(Cell::new_code("a"));
    nb.cells.push(Cell::new_code("b"));
    nb
}

fn feed(b: &mut OutputBuilder, nb: &mut Notebook, cell: usize, msgs: &Value) {
    b.start_cell(nb, cell).unwrap();
    for m in msgs.as_array().unwrap() {
        b.handle(nb, cell, m["msg_type"].as_str().unwrap(), &m["content"])
            .unwrap();
    }
    b.finish_cell(nb, cell).unwrap();
}

#[test]
fn separate_mode_equals_nbclient() {
    let fixture: Value = serde_json::from_str(NBCLIENT).unwrap();
    let mut nb = two_cells();
    let mut b = OutputBuilder::new(StreamMode::Separate);
    for (i, msgs) in fixture["msgs"].as_array().unwrap().iter().enumerate() {
        feed(&mut b, &mut nb, i, msgs);
    }
    for (i, want) in fixture["cells"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            Value::Array(nb.cells[i].outputs.clone().unwrap()),
            want["outputs"],
            "cell {i}"
        );
        assert_eq!(
            nb.cells[i].execution_count(),
            want["execution_count"].as_i64()
        );
    }
}

fn stream(name: &str, text: &str) -> Value {
    json!({"name": name, "text": text})
}

#[test]
fn coalesce_merges_consecutive_same_name_streams() {
    let mut nb = two_cells();
    let mut b = OutputBuilder::new(StreamMode::Coalesce);
    b.start_cell(&mut nb, 0).unwrap();
    assert_eq!(
        b.handle(&mut nb, 0, "stream", &stream("stdout", "a"))
            .unwrap(),
        OutputEvent::Appended(0)
    );
    assert_eq!(
        b.handle(&mut nb, 0, "stream", &stream("stdout", "b\n"))
            .unwrap(),
        OutputEvent::Extended(0)
    );
    assert_eq!(
        b.handle(&mut nb, 0, "stream", &stream("stderr", "e\n"))
            .unwrap(),
        OutputEvent::Appended(1)
    );
    b.handle(&mut nb, 0, "stream", &stream("stdout", "10%\r50%\r100%\n"))
        .unwrap();
    b.handle(&mut nb, 0, "stream", &stream("stdout", "abc\x08\x08d"))
        .unwrap();
    b.finish_cell(&mut nb, 0).unwrap();
    assert_eq!(
        Value::Array(nb.cells[0].outputs.clone().unwrap()),
        json!([
            {"output_type": "stream", "name": "stdout", "text": "ab\n"},
            {"output_type": "stream", "name": "stderr", "text": "e\n"},
            {"output_type": "stream", "name": "stdout", "text": "100%\nad"},
        ])
    );
}

#[test]
fn nbclient_coalesce_mode_merges_all_and_orders_stdout_first() {
    let mut nb = two_cells();
    let mut b = OutputBuilder::new(StreamMode::Nbclient);
    b.start_cell(&mut nb, 0).unwrap();
    b.handle(&mut nb, 0, "stream", &stream("stderr", "warn\n"))
        .unwrap();
    b.handle(&mut nb, 0, "stream", &stream("stdout", "a\n"))
        .unwrap();
    let disp =
        json!({"data": {"text/plain": "v1"}, "metadata": {}, "transient": {"display_id": "p"}});
    b.handle(&mut nb, 0, "display_data", &disp).unwrap();
    b.handle(&mut nb, 0, "stream", &stream("stdout", "b\n"))
        .unwrap();
    b.finish_cell(&mut nb, 0).unwrap();
    assert_eq!(
        Value::Array(nb.cells[0].outputs.clone().unwrap()),
        json!([
            {"output_type": "stream", "name": "stdout", "text": "a\nb\n"},
            {"output_type": "stream", "name": "stderr", "text": "warn\n"},
            {"output_type": "display_data", "data": {"text/plain": "v1"}, "metadata": {}},
        ])
    );
    // the display index followed the move: an update reaches the display
    assert_eq!(b.display_index().locations("p"), vec![(0, 2)]);
    let upd =
        json!({"data": {"text/plain": "v2"}, "metadata": {}, "transient": {"display_id": "p"}});
    b.start_cell(&mut nb, 1).unwrap();
    assert_eq!(
        b.handle(&mut nb, 1, "update_display_data", &upd).unwrap(),
        OutputEvent::DisplayUpdated(1)
    );
    assert_eq!(
        nb.cells[0].outputs.as_ref().unwrap()[2]["data"]["text/plain"],
        "v2"
    );
    assert!(nb.cells[1].outputs.as_ref().unwrap().is_empty());
}

#[test]
fn display_data_with_known_id_updates_earlier_cells_and_appends() {
    let mut nb = two_cells();
    let mut b = OutputBuilder::default();
    let d = |v: &str| json!({"data": {"text/plain": v}, "metadata": {}, "transient": {"display_id": "x"}});
    b.start_cell(&mut nb, 0).unwrap();
    b.handle(&mut nb, 0, "display_data", &d("one")).unwrap();
    b.start_cell(&mut nb, 1).unwrap();
    assert_eq!(
        b.handle(&mut nb, 1, "display_data", &d("two")).unwrap(),
        OutputEvent::Appended(0)
    );
    assert_eq!(
        nb.cells[0].outputs.as_ref().unwrap()[0]["data"]["text/plain"],
        "two"
    );
    assert_eq!(b.display_index().locations("x"), vec![(0, 0), (1, 0)]);
    // an immediate clear forgets the cell's displays
    assert_eq!(
        b.handle(&mut nb, 1, "clear_output", &json!({"wait": false}))
            .unwrap(),
        OutputEvent::Cleared
    );
    assert_eq!(b.display_index().locations("x"), vec![(0, 0)]);
}

#[test]
fn clear_output_wait_clears_at_next_output_only() {
    let mut nb = two_cells();
    let mut b = OutputBuilder::default();
    b.start_cell(&mut nb, 0).unwrap();
    b.handle(&mut nb, 0, "stream", &stream("stdout", "old"))
        .unwrap();
    assert_eq!(
        b.handle(&mut nb, 0, "clear_output", &json!({"wait": true}))
            .unwrap(),
        OutputEvent::ClearPending
    );
    assert_eq!(
        nb.cells[0].outputs.as_ref().unwrap().len(),
        1,
        "kept until the next output"
    );
    b.handle(&mut nb, 0, "stream", &stream("stdout", "new"))
        .unwrap();
    assert_eq!(
        nb.cells[0].outputs.as_ref().unwrap(),
        &vec![json!({"output_type": "stream", "name": "stdout", "text": "new"})]
    );
}

#[test]
fn ignored_and_malformed_messages() {
    let mut nb = two_cells();
    let mut b = OutputBuilder::default();
    for t in [
        "status",
        "comm_open",
        "comm_msg",
        "comm_close",
        "shutdown_reply",
    ] {
        assert_eq!(
            b.handle(&mut nb, 0, t, &json!({"execution_state": "busy"}))
                .unwrap(),
            OutputEvent::Ignored
        );
    }
    assert_eq!(
        b.handle(
            &mut nb,
            0,
            "execute_input",
            &json!({"code": "", "execution_count": 7})
        )
        .unwrap(),
        OutputEvent::Ignored
    );
    assert_eq!(nb.cells[0].execution_count(), Some(7));
    let e = b
        .handle(&mut nb, 0, "stream", &json!({"name": "stdout"}))
        .unwrap_err();
    assert_eq!(e.to_string(), "stream message: missing 'text'");
    assert!(matches!(
        b.handle(&mut nb, 9, "stream", &stream("stdout", "x")),
        Err(OutputError::NoSuchCell(9))
    ));
    assert!(nb.cells[0].outputs.as_ref().unwrap().is_empty());
    // execute_result keeps its execution_count; error outputs carry the traceback
    b.handle(
        &mut nb,
        0,
        "execute_result",
        &json!({"data": {"text/plain": "1"}, "metadata": {}, "execution_count": 8}),
    )
    .unwrap();
    b.handle(
        &mut nb,
        0,
        "error",
        &json!({"ename": "E", "evalue": "v", "traceback": ["t"]}),
    )
    .unwrap();
    assert_eq!(
        Value::Array(nb.cells[0].outputs.clone().unwrap()),
        json!([
            {"output_type": "execute_result", "data": {"text/plain": "1"}, "metadata": {}, "execution_count": 8},
            {"output_type": "error", "ename": "E", "evalue": "v", "traceback": ["t"]},
        ])
    );
    assert_eq!(nb.cells[0].execution_count(), Some(8));
}

#[test]
fn carriage_return_and_backspace_like_nbclient_regexes() {
    // re.sub(r".*\r(?=[^\n])", "", s)
    assert_eq!(apply_carriage_return("a\rb"), "b");
    assert_eq!(apply_carriage_return("abc\r\nx"), "abc\r\nx");
    assert_eq!(apply_carriage_return("1\r2\r3\n4\r"), "3\n4\r");
    assert_eq!(apply_carriage_return("x\r\ry"), "y");
    // a backspace erases the previous character of its line
    assert_eq!(apply_backspace("ab\x08\x08c"), "c");
    assert_eq!(apply_backspace("\n\x08a"), "\n\x08a");
    assert_eq!(apply_backspace("x\x08\x08"), "\x08");
}
