//! The examples' data loaders: the shipped digits CSV, bad files, the split.

#[path = "../examples/common/mod.rs"]
mod examples_common;

use std::io::Write;
use std::path::PathBuf;

use examples_common::{load_digits_csv, stratified_split, DataError};

fn shipped() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/digits.csv.gz")
}

fn temp(name: &str, content: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("candle-dp-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().write_all(content.as_bytes()).unwrap();
    path
}

fn header() -> String {
    (0..64).map(|i| format!("pixel_{i},")).collect::<String>() + "label\n"
}

fn row(pixel: &str, label: &str) -> String {
    std::iter::repeat_n(pixel, 64).collect::<Vec<_>>().join(",") + "," + label + "\n"
}

#[test]
fn the_shipped_digits_load() {
    let d = load_digits_csv(&shipped()).unwrap();
    assert_eq!(d.labels.len(), 1797);
    assert!(d.pixels.iter().all(|p| p.len() == 64 && p.iter().all(|v| (0.0..=1.0).contains(v))));
    for c in 0..10 {
        assert!(d.labels.iter().filter(|&&l| l == c).count() > 170);
    }
}

#[test]
fn bad_digits_files_are_clear_errors() {
    let err = load_digits_csv(&PathBuf::from("/nonexistent/digits.csv")).unwrap_err();
    assert!(matches!(err, DataError::Missing { .. }) && err.to_string().contains("examples/data"), "{err}");
    let cases = [
        (header() + &row("1", "3") + "1,2,3\n", "line 3: 3 columns"),
        (header() + &row("17", "3"), "pixel_0 = \"17\": must be an integer in 0..=16"),
        (header() + &row("1", "10"), "label = \"10\": must be an integer in 0..=9"),
        (header() + &row("x", "1"), "pixel_0 = \"x\""),
        ("a,b\n".to_string() + &row("1", "1"), "line 1: expected the header"),
        (header(), "no data rows"),
    ];
    for (k, (content, needle)) in cases.iter().enumerate() {
        let err = load_digits_csv(&temp(&format!("bad{k}.csv"), content)).unwrap_err();
        assert!(matches!(err, DataError::Malformed { .. }), "{err}");
        assert!(err.to_string().contains(needle), "case {k}: {err} lacks {needle}");
    }
    let ok = load_digits_csv(&temp("ok.csv", &(header() + &row("16", "9")))).unwrap();
    assert_eq!((ok.labels[0], ok.pixels[0][0]), (9, 1.0));
}

#[test]
fn the_split_is_stratified_disjoint_and_seeded() {
    let d = load_digits_csv(&shipped()).unwrap();
    let (train, test) = stratified_split(&d.labels, 0.2, 0);
    assert_eq!(train.len() + test.len(), 1797);
    assert!(train.iter().all(|i| test.binary_search(i).is_err()));
    for c in 0..10u32 {
        let total = d.labels.iter().filter(|&&l| l == c).count() as f64;
        let in_test = test.iter().filter(|&&i| d.labels[i] == c).count() as f64;
        assert!((in_test / total - 0.2).abs() < 0.01, "class {c}");
    }
    assert_eq!(stratified_split(&d.labels, 0.2, 0), (train, test.clone()));
    assert_ne!(stratified_split(&d.labels, 0.2, 1).1, test);
}
