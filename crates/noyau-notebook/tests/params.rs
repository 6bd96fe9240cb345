use noyau_notebook::params::shell_quote;
use noyau_notebook::{
    inject, Cell, InjectOptions, Language, Notebook, Param, ParamError, Parameters,
};
use serde_json::json;

const TRICKY: &str = "a \"q\" 's' \\ back\nnl\ttab é ü ₂ 😀 \u{1} \u{7f} $x";

fn params() -> Parameters {
    let mut p = Parameters::new();
    p.merge(Param::from_json(&json!({
        "s": TRICKY, "i": 42, "neg": -7, "f": 1.5, "big": 1e16, "small": 1e-5,
        "t": true, "n": null, "l": [1, "two", null, false, 2.5],
        "d": {"k": "v", "nested": {"a": [1, 2]}}, "_under": "x"
    })))
    .unwrap();
    p
}

// Expected texts: papermill's translators.py run on the same values
// (printed with json.dumps), with the documented R/Julia fixes.
#[test]
fn python_is_papermills_output() {
    let want = "# Parameters\ns = \"a \\\"q\\\" 's' \\\\ back\\nnl\\ttab \\xe9 \\xfc \\u2082 \\U0001f600 \\x01 \\x7f $x\"\ni = 42\nneg = -7\nf = 1.5\nbig = 1e+16\nsmall = 1e-05\nt = True\nn = None\nl = [1, \"two\", None, False, 2.5]\nd = {\"k\": \"v\", \"nested\": {\"a\": [1, 2]}}\n_under = \"x\"\n";
    assert_eq!(
        Language::Python.codify(&params(), "Parameters").unwrap(),
        want
    );
    let mut p = Parameters::new();
    p.set("inf", Param::Float(f64::INFINITY));
    p.set("ninf", Param::Float(f64::NEG_INFINITY));
    p.set("nan", Param::Float(f64::NAN));
    assert_eq!(
        Language::Python.codify(&p, "Parameters").unwrap(),
        "# Parameters\ninf = float('inf')\nninf = float('-inf')\nnan = float('nan')\n"
    );
}

#[test]
fn r_is_papermills_output_with_unicode_fix() {
    // papermill writes \xe9 \xfc (raw bytes in R); we write \u00e9 \u00fc.
    let want = "# Parameters\ns = \"a \\\"q\\\" 's' \\\\ back\\nnl\\ttab \\u00e9 \\u00fc \\u2082 \\U0001f600 \\x01 \\x7f $x\"\ni = 42\nneg = -7\nf = 1.5\nbig = 1e+16\nsmall = 1e-05\nt = TRUE\nn = NULL\nl = list(1, \"two\", NULL, FALSE, 2.5)\nd = list(\"k\" = \"v\", \"nested\" = list(\"a\" = list(1, 2)))\nunder = \"x\"\n";
    assert_eq!(Language::R.codify(&params(), "Parameters").unwrap(), want);
    assert_eq!(
        Language::R
            .translate("x", &Param::Float(f64::NEG_INFINITY))
            .unwrap(),
        "-Inf"
    );
    assert_eq!(
        Language::R.translate("x", &Param::Float(f64::NAN)).unwrap(),
        "NaN"
    );
    let e = Language::R
        .translate("x", &Param::Str("a\0b".into()))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "parameter 'x': R strings cannot contain a NUL character"
    );
}

#[test]
fn julia_is_papermills_output_with_unicode_and_dollar_fix() {
    let want = "# Parameters\ns = \"a \\\"q\\\" 's' \\\\ back\\nnl\\ttab \\u00e9 \\u00fc \\u2082 \\U0001f600 \\x01 \\x7f \\$x\"\ni = 42\nneg = -7\nf = 1.5\nbig = 1e+16\nsmall = 1e-05\nt = true\nn = nothing\nl = [1, \"two\", nothing, false, 2.5]\nd = Dict(\"k\" => \"v\", \"nested\" => Dict(\"a\" => [1, 2]))\n_under = \"x\"\n";
    assert_eq!(
        Language::Julia.codify(&params(), "Parameters").unwrap(),
        want
    );
    assert_eq!(
        Language::Julia
            .translate("x", &Param::Float(f64::INFINITY))
            .unwrap(),
        "Inf"
    );
}

#[test]
fn bash_is_papermills_output() {
    let mut p = params();
    p.set(
        "l",
        Param::from_json(&json!([1, "two words", null, false, 2.5, "it's"])),
    );
    let d = p.clone();
    let mut without_dict = Parameters::new();
    for (k, v) in d.iter().filter(|(k, _)| *k != "d") {
        without_dict.set(k, v.clone());
    }
    let want = "# Parameters\ns='a \"q\" '\"'\"'s'\"'\"' \\ back\nnl\ttab é ü ₂ 😀 \u{1} \u{7f} $x'\ni=42\nneg=-7\nf=1.5\nbig=1e+16\nsmall=1e-05\nt=true\nn=\nl=(1 'two words'  false 2.5 'it'\"'\"'s')\n_under=x\n";
    assert_eq!(
        Language::Bash.codify(&without_dict, "Parameters").unwrap(),
        want
    );
    assert_eq!(shell_quote(""), "''");
    assert_eq!(shell_quote("a@b%c+d=e:f,g./h-i_j"), "a@b%c+d=e:f,g./h-i_j");
    assert_eq!(shell_quote("a'b"), "'a'\"'\"'b'");
    let e = Language::Bash.codify(&p, "Parameters").unwrap_err();
    assert_eq!(
        e.to_string(),
        "parameter 'd': dicts cannot be expressed as bash variables"
    );
    let e = Language::Bash
        .translate("m", &Param::from_json(&json!([[1]])))
        .unwrap_err();
    assert!(matches!(e, ParamError::Unsupported { .. }));
}

#[test]
fn cli_typing_like_papermill() {
    use Param::*;
    let cases = [
        ("True", Bool(true)),
        ("true", Bool(true)),
        ("False", Bool(false)),
        ("false", Bool(false)),
        ("None", None),
        ("null", None),
        ("42", Int(42)),
        (" -7 ", Int(-7)),
        ("1_000", Int(1000)),
        ("+3", Int(3)),
        ("1.5", Float(1.5)),
        ("1e3", Float(1000.0)),
        (".5", Float(0.5)),
        ("inf", Float(f64::INFINITY)),
        ("-Infinity", Float(f64::NEG_INFINITY)),
        ("1__0", Str("1__0".into())),
        ("_1", Str("_1".into())),
        ("0x10", Str("0x10".into())),
        ("TRUE", Str("TRUE".into())),
        ("", Str("".into())),
        ("hello world", Str("hello world".into())),
    ];
    for (s, want) in cases {
        assert_eq!(Param::from_cli(s), want, "{s:?}");
    }
    assert!(matches!(Param::from_cli("nan"), Float(f) if f.is_nan()));
    assert_eq!(Param::raw("42"), Str("42".into()));
}

#[test]
fn parameters_merge_like_dict_update() {
    let mut p = Parameters::new();
    p.merge(serde_json::from_str::<Param>(r#"{"a": 1, "b": 2}"#).unwrap())
        .unwrap();
    p.merge(Param::None).unwrap(); // an empty YAML document
    p.set("a", Param::from_cli("x"));
    p.set("c", Param::Bool(true));
    let names: Vec<_> = p.iter().map(|(k, _)| k).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(p.get("a"), Some(&Param::Str("x".into())));
    assert!(p.merge(Param::Int(3)).is_err());
    // any serde format deserialises into Param
    let d: Param = serde_json::from_value(json!([1, 2.5, null])).unwrap();
    assert_eq!(
        d,
        Param::List(vec![Param::Int(1), Param::Float(2.5), Param::None])
    );
}

fn nb(cells: Vec<Cell>, lang: &str) -> Notebook {
    let mut nb = Notebook::new();
    nb.nbformat_minor = 4;
    nb.metadata
        .insert("kernelspec".into(), json!({"name": "k", "language": lang}));
    nb.cells = cells;
    nb
}

fn tagged(src: &str, tag: &str) -> Cell {
    let mut c = Cell::new_code(src);
    c.metadata.insert("tags".into(), json!([tag]));
    c
}

#[test]
fn injects_after_the_parameters_cell() {
    let mut n = nb(
        vec![
            Cell::new_markdown("# t"),
            tagged("a = 1", "parameters"),
            Cell::new_code("print(a)"),
            tagged("a = 0", "parameters"),
        ],
        "python",
    );
    let mut p = Parameters::new();
    p.set("a", Param::Int(2));
    let r = inject(&mut n, &p, &InjectOptions::default()).unwrap();
    assert_eq!(
        (r.index, r.language, r.warning.clone()),
        (2, Language::Python, None)
    );
    let c = &n.cells[2];
    assert_eq!(c.source, "# Parameters\na = 2\n");
    assert!(c.has_tag("injected-parameters") && c.is_code());
    assert_eq!(c.execution_count(), None);
    assert_eq!(c.outputs, Some(vec![]));
    assert_eq!(n.nbformat_minor, 5, "upgraded like papermill");
    assert!(n.cells.iter().all(|c| c.id().is_some()));
    assert_eq!(n.metadata["papermill"]["parameters"], json!({"a": 2}));

    // running again replaces the injected cell in place
    p.set("a", Param::Int(3));
    let r = inject(
        &mut n,
        &p,
        &InjectOptions {
            hide_source: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.index, 2);
    assert_eq!(n.cells.len(), 5);
    assert_eq!(n.cells[2].source, "# Parameters\na = 3\n");
    assert_eq!(
        n.cells[2].metadata["jupyter"],
        json!({"source_hidden": true})
    );
}

#[test]
fn no_parameters_cell_injects_at_top_with_warning() {
    let mut n = nb(vec![Cell::new_code("x")], "R");
    let mut p = Parameters::new();
    p.set("_x", Param::Bool(true));
    let r = inject(&mut n, &p, &InjectOptions::default()).unwrap();
    assert_eq!(r.index, 0);
    assert_eq!(
        r.warning.as_deref(),
        Some("Input notebook does not contain a cell with tag 'parameters'")
    );
    assert_eq!(n.cells[0].source, "# Parameters\nx = TRUE\n");
}

#[test]
fn language_resolution_and_unknown_language() {
    let mut n = nb(vec![], "python");
    n.metadata
        .insert("language_info".into(), json!({"name": "julia"}));
    assert_eq!(
        n.language(),
        Some("julia"),
        "language_info wins, as in papermill"
    );
    assert_eq!(
        Language::resolve(Some("bash"), Some("python")).unwrap(),
        Language::Bash
    );
    assert_eq!(
        Language::resolve(Some("python3"), Some("R")).unwrap(),
        Language::R
    );
    let mut n = nb(vec![Cell::new_code("x")], "scala");
    let before = n.clone();
    let e = inject(&mut n, &Parameters::new(), &InjectOptions::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "no parameter translator for kernel 'k' or language 'scala'; supported languages: python, R, julia, bash"
    );
    assert_eq!(n, before, "unchanged on error");
}

/// A parameter's name is written unquoted (`NAME = VALUE`): one from a
/// parameters or sweep file someone else wrote must not carry code.
#[test]
fn a_name_that_is_not_an_identifier_is_never_written() {
    let evil = "lr = 0.1; __import__('os').system('id'); lr";
    let mut p = Parameters::new();
    let merged = p.merge(Param::from_json(&json!({ evil: 1 })));
    assert!(
        matches!(merged, Err(ParamError::BadName(ref n)) if n == evil),
        "{merged:?}"
    );
    // the cell's writer refuses it too, whatever filled the parameters
    p.set(evil, Param::Int(1));
    for lang in [
        Language::Python,
        Language::R,
        Language::Julia,
        Language::Bash,
    ] {
        let e = lang.codify(&p, "Parameters").unwrap_err();
        assert!(e.to_string().contains("not a plain identifier"), "{e}");
    }
    for bad in ["", "1x", ".x", "a b", "a-b", "x\ny", "$(id)", "a;b"] {
        assert!(noyau_notebook::check_name(bad).is_err(), "{bad:?}");
    }
    for good in ["lr", "_under", "alpha2", "été", "my.param"] {
        noyau_notebook::check_name(good).unwrap();
    }
    // in bash an upper-case name is the shell's: PROMPT_COMMAND runs code
    let mut shell = Parameters::new();
    shell.set("PROMPT_COMMAND", Param::Str("id".into()));
    let e = Language::Bash.codify(&shell, "Parameters").unwrap_err();
    assert!(matches!(e, ParamError::ShellName(_)), "{e}");
    assert!(Language::Python.codify(&shell, "Parameters").is_ok());
    let mut proxy = Parameters::new();
    proxy.set("https_proxy", Param::Str("http://evil:3128".into()));
    assert!(Language::Bash.codify(&proxy, "Parameters").is_err());
    // a mapping with a refused name sets none of its names
    let mut p = Parameters::new();
    assert!(p
        .merge(Param::from_json(&json!({"a": 1, "b c": 2})))
        .is_err());
    assert!(p.is_empty(), "{p:?}");
    // `.` is R's: elsewhere it assigns to an attribute of something there
    let mut dotted = Parameters::new();
    dotted.set("os.sep", Param::Int(1));
    assert!(Language::Python.codify(&dotted, "Parameters").is_err());
    assert_eq!(
        Language::R.codify(&dotted, "Parameters").unwrap(),
        "# Parameters\nos.sep = 1\n"
    );
}
