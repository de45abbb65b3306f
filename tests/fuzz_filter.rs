//! Fuzzing the List filter parser (containerd's filter language), which
//! parses strings straight from any client of the socket.
//!
//! - The corpus `tests/corpus/filters.jsonl` pins hostile and tricky
//!   filters: whether each parses and, if so, whether it matches a fixed
//!   snapshot. Add a line for every bug found.
//! - Property tests: arbitrary input never panics and stays fast (no
//!   pathological regex or parser blow-up); generated well-formed filters
//!   parse and select exactly what they say. Failing inputs are saved in
//!   `tests/corpus/fuzz_filter.regressions` (commit that file) and replayed
//!   first on every run. `PROPTEST_CASES` sets the number of cases.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cowsnap::filter::{FilterSet, SnapshotFields};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};

/// Parsing and matching one filter set must take well under this, whatever
/// the input (a debug build on a loaded 2-core machine included).
const SLOW: Duration = Duration::from_secs(2);

fn target_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("containerd.io/gc.root".to_owned(), "x".to_owned()),
        ("a.b".to_owned(), "1".to_owned()),
    ])
}

fn target(labels: &BTreeMap<String, String>) -> SnapshotFields<'_> {
    SnapshotFields {
        name: "ns/ctr-1",
        parent: "base",
        kind: "active",
        labels,
    }
}

fn runner(name: &'static str, cases: u32) -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    TestRunner::new(Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(name))),
        ..Config::default()
    })
}

#[test]
fn corpus_filters_parse_and_match_as_recorded() {
    let corpus = include_str!("corpus/filters.jsonl");
    let labels = target_labels();
    let mut n = 0;
    for (i, line) in corpus.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("line {}: {e}", i + 1));
        let filter = entry["filter"].as_str().expect("filter");
        let parses = entry["parses"].as_bool().expect("parses");
        let start = Instant::now();
        let got = FilterSet::parse(&[filter]);
        assert_eq!(
            got.is_ok(),
            parses,
            "line {}: {filter:?}: {:?}",
            i + 1,
            got.as_ref().err()
        );
        if let Ok(set) = got {
            let want = entry["matches"].as_bool().expect("matches");
            assert_eq!(
                set.matches(&target(&labels)),
                want,
                "line {}: {filter:?} against ns/ctr-1",
                i + 1
            );
        }
        assert!(start.elapsed() < SLOW, "line {}: {filter:?} is slow", i + 1);
        n += 1;
    }
    assert!(n >= 40, "corpus has {n} entries");
}

/// Pieces that make parsers and regex compilers work hardest.
fn hostile_filter() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "name",
        "parent",
        "kind",
        "labels",
        "labels.\"a.b\"",
        ".",
        ",",
        "==",
        "!=",
        "~=",
        "=",
        "\"",
        "\\",
        "\\x",
        "\\u",
        "\\U",
        "\\0",
        "\\\"",
        "(",
        ")",
        "[",
        "]",
        "[:",
        ":]",
        "{",
        "}",
        "{1000}",
        "*",
        "+",
        "?",
        "|",
        "^",
        "$",
        "\\d",
        "\\w",
        "\\b",
        "(?i)",
        "(?s)",
        "a",
        "é",
        "😀",
        " ",
        "\t",
        "\n",
        "\0",
        "\u{FFFD}",
        "9",
        "f",
    ]);
    prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

#[test]
fn arbitrary_filters_never_panic_and_stay_fast() {
    let labels = target_labels();
    let strategy = prop::collection::vec(
        prop_oneof![any::<String>(), hostile_filter(), "[ -~]{0,200}"],
        0..4,
    );
    runner("tests/corpus/fuzz_filter.regressions", 512)
        .run(&strategy, |filters| {
            let start = Instant::now();
            if let Ok(set) = FilterSet::parse(&filters) {
                set.matches(&target(&labels));
                let empty = BTreeMap::new();
                set.matches(&SnapshotFields {
                    name: "",
                    parent: "",
                    kind: "bogus",
                    labels: &empty,
                });
            }
            prop_assert!(start.elapsed() < SLOW, "slow: {filters:?}");
            Ok(())
        })
        .unwrap();
}

/// A value made only of characters that need no escaping inside quotes.
fn plain_value() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_./:@+-]{1,24}"
}

#[test]
fn well_formed_filters_select_exactly_what_they_say() {
    let strategy = (
        plain_value(),
        plain_value(),
        plain_value(),
        prop::sample::select(vec!["active", "view", "committed"]),
    );
    runner("tests/corpus/fuzz_filter_semantics.regressions", 256)
        .run(&strategy, |(name, key, value, kind)| {
            let labels = BTreeMap::from([(key.clone(), value.clone())]);
            let snap = SnapshotFields {
                name: &name,
                parent: "",
                kind,
                labels: &labels,
            };
            let must = |f: String, want: bool| -> Result<(), TestCaseError> {
                let set = FilterSet::parse(&[&f])
                    .map_err(|e| TestCaseError::fail(format!("{f:?} does not parse: {e}")))?;
                prop_assert_eq!(set.matches(&snap), want, "{}", f);
                Ok(())
            };
            must(format!("name==\"{name}\""), true)?;
            must(format!("name!=\"{name}\""), false)?;
            must(format!("name==\"{name}x\""), false)?;
            must(format!("kind=={kind}"), true)?;
            must(format!("kind!={kind}"), false)?;
            must(format!("labels.\"{key}\"==\"{value}\""), true)?;
            must(format!("labels.\"{key}\""), true)?;
            must(format!("labels.\"{key}x\""), false)?;
            must(format!("labels.\"{key}\"==\"{value}\",kind=={kind}"), true)?;
            must(
                format!("labels.\"{key}\"==\"{value}\",name==\"{name}x\""),
                false,
            )?;
            // Several filter strings are OR-ed.
            let set = FilterSet::parse(&[format!("name==\"{name}x\""), format!("kind=={kind}")])
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(set.matches(&snap));
            Ok(())
        })
        .unwrap();
}
