//! containerd's filter language (`filters` package, containerd 1.6), as used by
//! the snapshots List/Walk RPC.
//!
//! This is a faithful port, quirks included, because clients (ctr, nerdctl,
//! kubelet via CRI) build filter strings against containerd's behaviour:
//!
//! * a filter string is `selector ("," selector)*`, a selector is
//!   `fieldpath [op value]`, a fieldpath is `field ("." field)*`;
//! * several filter strings are OR-ed; the empty string matches everything;
//! * whitespace is skipped only *before* a token, so `name == x` parses but
//!   `name==x ` and `name==x ,kind` do not;
//! * `!=` and `~=` compare against `""` when the field is absent, while `==`
//!   requires presence;
//! * a regex that fails to compile is not a parse error: the selector simply
//!   never matches (containerd compiles it lazily and logs the failure).
//!
//! Regexes use Go's RE2 syntax, run on the `regex` crate: close, with Go's
//! ASCII-only `\d \w \s \b` restored, but not identical (e.g. Rust accepts
//! `a**`, which Go rejects, and `(?i)` or `\pL` need regex features that
//! may not be enabled, failing to compile without them).

use std::collections::BTreeMap;
use std::fmt;

use regex::{Regex, RegexBuilder};

/// Cap on a `~=` pattern's compiled program and lazy-DFA cache, so that an
/// untrusted client cannot make us allocate or spin without bound.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Cap on distinct `~=` patterns per [`FilterSet`]: each may cost up to a few
/// [`REGEX_SIZE_LIMIT`]s and milliseconds to compile, and a 4 MiB request could
/// otherwise carry hundreds of thousands. Exceeding it is a [`FilterError`]
/// (containerd has no such cap; no sane filter comes near it).
const MAX_REGEXES: usize = 64;

/// Error for a malformed filter; the caller maps it to gRPC InvalidArgument.
#[derive(Debug, thiserror::Error)]
#[error("invalid filter {input:?}: {message}")]
pub struct FilterError {
    /// The filter string that failed to parse.
    pub input: String,
    /// What went wrong and at which byte offset.
    pub message: String,
}

/// Anything a filter can be evaluated against.
pub trait Fields {
    /// Returns the value of the field at `path` (e.g. `["labels",
    /// "containerd.io/gc.root"]` or `["kind"]`), or `None` if it is absent.
    ///
    /// `path` is never empty.
    fn field(&self, path: &[String]) -> Option<String>;
}

/// A set of filters, one per input string, OR-ed together.
#[derive(Debug, Clone)]
pub struct FilterSet {
    /// One entry per input string; an empty conjunction matches everything.
    filters: Vec<Vec<Selector>>,
}

impl FilterSet {
    /// Parses each string in `filters`; the result matches a target when any
    /// of them does. No strings at all, or any empty string, matches
    /// everything. Fails on the first malformed string, or when the set holds
    /// more than 64 distinct `~=` patterns (a bound containerd lacks).
    pub fn parse<S: AsRef<str>>(filters: &[S]) -> Result<FilterSet, FilterError> {
        let mut regexes = BTreeMap::new();
        let filters = filters
            .iter()
            .map(|s| parse_one(s.as_ref(), &mut regexes))
            .collect::<Result<_, _>>()?;
        Ok(FilterSet { filters })
    }

    /// Reports whether `target` satisfies the filter set.
    pub fn matches(&self, target: &dyn Fields) -> bool {
        self.filters.is_empty()
            || self
                .filters
                .iter()
                .any(|all| all.iter().all(|s| s.matches(target)))
    }

    /// True when the set matches every target (no filters, or an empty
    /// filter string among them), so callers can skip evaluation entirely.
    pub fn is_always(&self) -> bool {
        self.filters.is_empty() || self.filters.iter().any(Vec::is_empty)
    }
}

/// Field values of a snapshot as containerd's snapshot adaptor
/// (`metadata.adaptSnapshot`) exposes them.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotFields<'a> {
    /// Snapshot key; always present, even when empty.
    pub name: &'a str,
    /// Parent key; always present, even when empty (so `parent` alone matches
    /// every snapshot; use `parent!=""` to ask for one that has a parent).
    pub parent: &'a str,
    /// `"active"`, `"view"` or `"committed"`; anything else is absent.
    pub kind: &'a str,
    /// Snapshot labels.
    pub labels: &'a BTreeMap<String, String>,
}

impl Fields for SnapshotFields<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        // Like containerd, only the first element selects name/parent/kind;
        // anything after it is ignored (`name.x` is just `name`).
        match path.first()?.as_str() {
            "kind" => {
                matches!(self.kind, "active" | "view" | "committed").then(|| self.kind.to_owned())
            }
            "name" => Some(self.name.to_owned()),
            "parent" => Some(self.parent.to_owned()),
            // `labels.a.b` and `labels."a.b"` name the same key, and bare
            // `labels` names the key "" -- but never when there are no labels.
            "labels" if !self.labels.is_empty() => {
                self.labels.get(&path.get(1..)?.join(".")).cloned()
            }
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
struct Selector {
    /// `None` when an element unquoted to invalid UTF-8 (`"\xff"`): no
    /// field of ours can have such a name, so the field is treated as absent.
    path: Option<Vec<String>>,
    op: Op,
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    /// Values are bytes because `\x` and octal escapes may yield invalid UTF-8,
    /// which then simply equals nothing.
    Equal(Vec<u8>),
    NotEqual(Vec<u8>),
    /// `None` when the pattern did not compile: it never matches.
    Matches(Option<Regex>),
}

impl Selector {
    fn matches(&self, target: &dyn Fields) -> bool {
        let value = self.path.as_ref().and_then(|p| target.field(p));
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(want) => value.is_some_and(|v| v.as_bytes() == want.as_slice()),
            Op::NotEqual(want) => value.unwrap_or_default().as_bytes() != want.as_slice(),
            Op::Matches(re) => re
                .as_ref()
                .is_some_and(|re| re.is_match(&value.unwrap_or_default())),
        }
    }
}

/// Compiled patterns by source, shared across a set so duplicates cost nothing.
type Regexes = BTreeMap<String, Option<Regex>>;

fn compile_regex(pattern: &str) -> Option<Regex> {
    RegexBuilder::new(&ascii_perl_classes(pattern))
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        // Go's RE2 syntax has octal escapes (`\012`); Rust's needs opting in.
        .octal(true)
        .build()
        .ok()
}

/// Rewrites `\d \D \w \W \s \S \b \B` to the ASCII-only meaning they have in
/// Go's RE2 (Rust's are Unicode-aware, and Unicode `\w{64}` alone would blow
/// [`REGEX_SIZE_LIMIT`]). Follows Go's class syntax, where a `[` inside a
/// class is literal unless it opens `[:name:]`, and escapes the `[`, `&`, `~`
/// that Rust would read as nested classes or set operators.
fn ascii_perl_classes(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut rest = pattern;
    // Inside `[...]`, and whether a `]` would still be literal (Go, like
    // Perl, allows `[]a]` and `[^]a]`).
    let (mut class, mut first) = (false, false);
    // Once no `:]` is left, stop looking for one: keeps hostile input linear.
    let mut named_close_left = true;
    while let Some(c) = rest.chars().next() {
        rest = rest.get(c.len_utf8()..).unwrap_or_default();
        let was_first = std::mem::take(&mut first);
        match c {
            '\\' => {
                let Some(e) = rest.chars().next() else {
                    out.push(c);
                    break;
                };
                rest = rest.get(e.len_utf8()..).unwrap_or_default();
                out.push_str(match e {
                    'd' => "[0-9]",
                    'D' => "[^0-9]",
                    'w' => "[0-9A-Za-z_]",
                    'W' => "[^0-9A-Za-z_]",
                    's' => r"[\t\n\f\r ]",
                    'S' => r"[^\t\n\f\r ]",
                    'b' if !class => r"(?-u:\b)",
                    'B' if !class => r"(?-u:\B)",
                    _ => {
                        out.push(c);
                        out.push(e);
                        continue;
                    }
                });
            }
            '[' if !class => {
                out.push(c);
                class = true;
                first = true;
                if let Some(r) = rest.strip_prefix('^') {
                    out.push('^');
                    rest = r;
                }
            }
            ']' if class && !was_first => {
                out.push(c);
                class = false;
            }
            '[' if class => {
                let named = rest.strip_prefix(':').filter(|_| named_close_left);
                match named.map(|r| r.split_once(":]")) {
                    Some(Some((name, after))) => {
                        out.push_str("[:");
                        out.push_str(name);
                        out.push_str(":]");
                        rest = after;
                    }
                    found => {
                        named_close_left &= found.is_none();
                        out.push_str(r"\[");
                    }
                }
            }
            '&' | '~' if class => {
                out.push('\\');
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out
}

fn parse_one(input: &str, regexes: &mut Regexes) -> Result<Vec<Selector>, FilterError> {
    if input.is_empty() {
        return Ok(Vec::new());
    }
    let mut p = Parser {
        sc: Scanner {
            input,
            pos: 0,
            value: false,
            err: None,
        },
        regexes,
    };
    p.selectors()
}

/// One decoded character, or why there isn't one.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ch {
    Eof,
    /// NUL and U+FFFD are rejected anywhere (Go's decoder reports both as errors).
    Illegal(&'static str),
    C(char),
}

#[derive(Debug, Clone, Copy)]
enum Tok<'a> {
    Eof,
    Illegal(&'static str),
    /// Raw text including the delimiters.
    Quoted(&'a str),
    Value(&'a str),
    Field(&'a str),
    Separator,
    Operator(&'a str),
    Other,
}

struct Scanner<'a> {
    input: &'a str,
    /// Byte offset of the next unread character; always a char boundary.
    pos: usize,
    /// Set after an operator: the next bare token is a value, not a field.
    value: bool,
    /// First error seen, as Go's scanner reports only that one.
    err: Option<&'static str>,
}

impl<'a> Scanner<'a> {
    fn raw(&self) -> Option<char> {
        self.input.get(self.pos..).and_then(|s| s.chars().next())
    }

    fn peek(&self) -> Ch {
        match self.raw() {
            None => Ch::Eof,
            Some('\0') => Ch::Illegal("unexpected null"),
            Some('\u{FFFD}') => Ch::Illegal("rune error"),
            Some(c) => Ch::C(c),
        }
    }

    fn next(&mut self) -> Ch {
        let ch = self.peek();
        self.pos += self.raw().map_or(0, char::len_utf8);
        if let Ch::Illegal(msg) = ch {
            self.error(msg);
        }
        ch
    }

    fn error(&mut self, msg: &'static str) {
        self.err.get_or_insert(msg);
    }

    fn first_error(&self) -> &'static str {
        self.err.unwrap_or("illegal input")
    }

    fn text(&self, start: usize) -> &'a str {
        self.input.get(start..self.pos).unwrap_or_default()
    }

    fn eat_while(&mut self, pred: impl Fn(char) -> bool) {
        while let Ch::C(c) = self.peek()
            && pred(c)
        {
            self.next();
        }
    }

    /// Returns the byte offset where the token starts and the token.
    fn scan(&mut self) -> (usize, Tok<'a>) {
        loop {
            let start = self.pos;
            let c = match self.next() {
                Ch::Eof => return (start, Tok::Eof),
                Ch::Illegal(_) => return (start, Tok::Illegal(self.first_error())),
                Ch::C(c) => c,
            };
            // The order of these tests is significant: a value may not start
            // with a quote, separator or operator rune, but may contain them.
            let tok = match c {
                '/' | '|' | '"' if self.scan_quoted(c) => Tok::Quoted(self.text(start)),
                '/' | '|' | '"' => Tok::Illegal(self.first_error()),
                ',' | '.' => {
                    self.value = false;
                    Tok::Separator
                }
                '=' | '!' | '~' => {
                    self.eat_while(|c| matches!(c, '=' | '!' | '~'));
                    self.value = true;
                    Tok::Operator(self.text(start))
                }
                c if c.is_whitespace() => continue,
                _ if self.value => {
                    self.eat_while(is_value_rune);
                    self.value = false;
                    Tok::Value(self.text(start))
                }
                c if is_field_rune(c) => {
                    self.eat_while(is_field_rune);
                    Tok::Field(self.text(start))
                }
                _ => Tok::Other,
            };
            return (start, tok);
        }
    }

    /// Consumes a quoted literal up to the closing `quote`. Returns false if it
    /// is unterminated or holds a malformed escape (scanning still continues to
    /// the closing quote in the latter case, as Go does).
    fn scan_quoted(&mut self, quote: char) -> bool {
        let mut legal = true;
        let mut ch = self.next();
        while ch != Ch::C(quote) {
            match ch {
                Ch::C('\n') | Ch::Eof | Ch::Illegal(_) => {
                    self.error("quoted literal not terminated");
                    return false;
                }
                Ch::C('\\') => {
                    let (after, ok) = self.scan_escape(quote);
                    ch = after;
                    legal &= ok;
                }
                Ch::C(_) => ch = self.next(),
            }
        }
        legal
    }

    /// Returns the character after the escape sequence and whether it was legal.
    fn scan_escape(&mut self, quote: char) -> (Ch, bool) {
        let ch = self.next();
        match ch {
            Ch::C('a' | 'b' | 'f' | 'n' | 'r' | 't' | 'v' | '\\') => (self.next(), true),
            Ch::C(c) if c == quote => (self.next(), true),
            Ch::C('0'..='7') => self.scan_digits(ch, 8, 3),
            Ch::C('x') => self.scan_digits_after(16, 2),
            Ch::C('u') => self.scan_digits_after(16, 4),
            Ch::C('U') => self.scan_digits_after(16, 8),
            _ => {
                self.error("illegal escape sequence");
                (ch, false)
            }
        }
    }

    fn scan_digits_after(&mut self, base: u32, n: u32) -> (Ch, bool) {
        let first = self.next();
        self.scan_digits(first, base, n)
    }

    fn scan_digits(&mut self, mut ch: Ch, base: u32, mut n: u32) -> (Ch, bool) {
        while n > 0 && digit_val(ch) < base {
            ch = self.next();
            n -= 1;
        }
        if n > 0 {
            self.error("illegal numeric escape sequence");
            return (ch, false);
        }
        (ch, true)
    }
}

fn digit_val(ch: Ch) -> u32 {
    match ch {
        Ch::C(c) => c.to_digit(16).unwrap_or(16),
        _ => 16,
    }
}

fn is_field_rune(c: char) -> bool {
    c == '_' || c.is_ascii_alphanumeric()
}

/// Go's `isValueRune`: a graphic, non-space rune other than `,`. Rust has no
/// general-category tables, so "graphic" is approximated as "not control, not
/// format (Cf, Unicode 13 as in Go 1.19), not private use, not a
/// noncharacter"; only unassigned code points are classified differently.
fn is_value_rune(c: char) -> bool {
    // Inclusive (low, high) pairs of Unicode 13's Cf category.
    const FORMAT: &[u32] = &[
        0xAD, 0xAD, 0x600, 0x605, 0x61C, 0x61C, 0x6DD, 0x6DD, 0x70F, 0x70F, 0x8E2, 0x8E2, 0x180E,
        0x180E, 0x200B, 0x200F, 0x202A, 0x202E, 0x2060, 0x2064, 0x2066, 0x206F, 0xFEFF, 0xFEFF,
        0xFFF9, 0xFFFB, 0x110BD, 0x110BD, 0x110CD, 0x110CD, 0x13430, 0x13438, 0x1BCA0, 0x1BCA3,
        0x1D173, 0x1D17A, 0xE0001, 0xE0001, 0xE0020, 0xE007F,
    ];
    let u = u32::from(c);
    let private_use = matches!(u, 0xE000..=0xF8FF | 0xF_0000..=0xF_FFFD | 0x10_0000..=0x10_FFFD);
    let nonchar = matches!(u, 0xFDD0..=0xFDEF) || u & 0xFFFE == 0xFFFE;
    c != ','
        && !c.is_whitespace()
        && !c.is_control()
        && !private_use
        && !nonchar
        && !FORMAT
            .chunks_exact(2)
            .any(|r| matches!(r, [lo, hi] if (*lo..=*hi).contains(&u)))
}

struct Parser<'a, 'r> {
    sc: Scanner<'a>,
    regexes: &'r mut Regexes,
}

impl Parser<'_, '_> {
    fn err(&self, pos: usize, msg: impl fmt::Display) -> FilterError {
        FilterError {
            input: self.sc.input.to_owned(),
            message: format!("parse error at byte {pos}: {msg}"),
        }
    }

    fn selectors(&mut self) -> Result<Vec<Selector>, FilterError> {
        let mut all = vec![self.selector()?];
        // Raw lookahead, no whitespace skipping: this is why trailing or
        // pre-comma whitespace is rejected.
        loop {
            match self.sc.peek() {
                Ch::C(',') => {
                    self.sc.scan();
                    all.push(self.selector()?);
                }
                Ch::Eof => return Ok(all),
                Ch::C(c) => return Err(self.err(self.sc.pos, format!("unexpected input: {c:?}"))),
                Ch::Illegal(msg) => return Err(self.err(self.sc.pos, msg)),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let path = self.fieldpath()?.into_iter().map(String::from_utf8);
        let path = path.collect::<Result<Vec<_>, _>>().ok();
        if matches!(self.sc.peek(), Ch::C(',') | Ch::Eof) {
            let op = Op::Present;
            return Ok(Selector { path, op });
        }
        let (pos, tok) = self.sc.scan();
        let op = match tok {
            Tok::Operator("==") => Op::Equal(self.value(false)?),
            Tok::Operator("!=") => Op::NotEqual(self.value(false)?),
            Tok::Operator("~=") => {
                let value = self.value(true)?;
                Op::Matches(self.regex(pos, value)?)
            }
            Tok::Operator(op) => return Err(self.err(pos, format!("unsupported operator {op:?}"))),
            Tok::Illegal(msg) => return Err(self.err(pos, msg)),
            _ => return Err(self.err(pos, r#"expected an operator ("=="|"!="|"~=")"#)),
        };
        Ok(Selector { path, op })
    }

    /// An invalid pattern (including one that is not UTF-8) never matches.
    fn regex(&mut self, pos: usize, pattern: Vec<u8>) -> Result<Option<Regex>, FilterError> {
        let Ok(pattern) = String::from_utf8(pattern) else {
            return Ok(None);
        };
        if let Some(re) = self.regexes.get(&pattern) {
            return Ok(re.clone());
        }
        if self.regexes.len() >= MAX_REGEXES {
            let msg = format!("more than {MAX_REGEXES} distinct regular expressions");
            return Err(self.err(pos, msg));
        }
        let re = compile_regex(&pattern);
        self.regexes.insert(pattern, re.clone());
        Ok(re)
    }

    fn fieldpath(&mut self) -> Result<Vec<Vec<u8>>, FilterError> {
        let mut path = vec![self.field()?];
        while self.sc.peek() == Ch::C('.') {
            self.sc.scan();
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> Result<Vec<u8>, FilterError> {
        match self.sc.scan() {
            (_, Tok::Field(s)) => Ok(s.as_bytes().to_vec()),
            (pos, Tok::Quoted(s)) => self.unquote(pos, s, false),
            (pos, Tok::Illegal(msg)) => Err(self.err(pos, msg)),
            (pos, _) => Err(self.err(pos, "expected field or quoted")),
        }
    }

    fn value(&mut self, allow_alt_quotes: bool) -> Result<Vec<u8>, FilterError> {
        match self.sc.scan() {
            (_, Tok::Value(s) | Tok::Field(s)) => Ok(s.as_bytes().to_vec()),
            (pos, Tok::Quoted(s)) => self.unquote(pos, s, allow_alt_quotes),
            (pos, Tok::Illegal(msg)) => Err(self.err(pos, msg)),
            (pos, _) => Err(self.err(pos, "expected value or quoted")),
        }
    }

    fn unquote(&self, pos: usize, raw: &str, allow_alts: bool) -> Result<Vec<u8>, FilterError> {
        if !allow_alts && !raw.starts_with('"') {
            return Err(self.err(pos, "invalid quote encountered"));
        }
        unquote(raw).ok_or_else(|| self.err(pos, "unquoting failed: quote syntax error"))
    }
}

/// Go's `strconv.Unquote` for a `"`, `/` or `|` delimited literal, with the
/// alternative delimiters treated like `"`. Yields bytes because `\xNN` and
/// octal escapes may produce invalid UTF-8.
fn unquote(raw: &str) -> Option<Vec<u8>> {
    let quote = raw
        .chars()
        .next()
        .filter(|q| matches!(q, '"' | '/' | '|'))?;
    let body = raw.strip_prefix(quote)?.strip_suffix(quote)?;
    if body.contains('\n') {
        return None;
    }
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body;
    while let Some(c) = rest.chars().next() {
        rest = rest.get(c.len_utf8()..)?;
        if c == quote {
            return None;
        }
        if c != '\\' {
            out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
            continue;
        }
        let esc = rest.chars().next()?;
        rest = rest.get(esc.len_utf8()..)?;
        let simple = match esc {
            'a' => Some(0x07),
            'b' => Some(0x08),
            'f' => Some(0x0C),
            'n' => Some(b'\n'),
            'r' => Some(b'\r'),
            't' => Some(b'\t'),
            'v' => Some(0x0B),
            '\\' => Some(b'\\'),
            '"' | '/' | '|' if esc == quote => Some(esc as u8),
            _ => None,
        };
        if let Some(b) = simple {
            out.push(b);
            continue;
        }
        let (radix, digits) = match esc {
            'x' => (16, 2),
            'u' => (16, 4),
            'U' => (16, 8),
            '0'..='7' => (8, 2),
            _ => return None,
        };
        let text = rest.get(..digits)?;
        rest = rest.get(digits..)?;
        let mut v = if radix == 8 { esc.to_digit(8)? } else { 0 };
        for d in text.chars() {
            v = v.checked_mul(radix)?.checked_add(d.to_digit(radix)?)?;
        }
        match esc {
            // Single bytes, possibly not UTF-8; octal above 0o377 is an error.
            'x' | '0'..='7' => out.push(u8::try_from(v).ok()?),
            _ if v > 0x10_FFFF => return None,
            // Go encodes surrogates as U+FFFD instead of rejecting them.
            _ => {
                let c = char::from_u32(v).unwrap_or('\u{FFFD}');
                out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    //! Expected results come from a Go program running containerd 1.6.20's
    //! `filters.ParseAll` against the same four snapshots (`adaptSnapshot`).

    use super::*;
    use proptest::prelude::*;

    fn corpus_labels() -> [BTreeMap<String, String>; 4] {
        let map = |kv: &[(&str, &str)]| kv.iter().map(|&(k, v)| (k.into(), v.into())).collect();
        [
            map(&[]),
            map(&[
                ("a/b", "c"),
                ("x.y", "z"),
                ("containerd.io/gc.root", "2024"),
            ]),
            map(&[("", "empty-key"), ("k", ""), ("tab\tkey", "v\"q")]),
            map(&[("a.b.c", "1"), ("é", "ü")]),
        ]
    }

    /// Which of the four corpus snapshots match, as "1010", or "ERR".
    fn eval(filters: &[&str]) -> String {
        let labels = corpus_labels();
        let snap = |name, parent, kind, labels| SnapshotFields {
            name,
            parent,
            kind,
            labels,
        };
        let corpus = [
            snap("foo", "", "active", &labels[0]),
            snap("bar", "foo", "committed", &labels[1]),
            snap("héllo wörld", "bar", "view", &labels[2]),
            snap("", "", "unknown", &labels[3]),
        ];
        match FilterSet::parse(filters) {
            Err(_) => "ERR".into(),
            Ok(f) => corpus
                .iter()
                .map(|s| if f.matches(s) { '1' } else { '0' })
                .collect(),
        }
    }

    fn check(cases: &[(&str, &str)]) {
        for &(input, want) in cases {
            assert_eq!(eval(&[input]), want, "filter {input:?}");
        }
    }

    /// Exposes one fixed value for every path, recording nothing.
    struct Fixed<'a>(&'a str);
    impl Fields for Fixed<'_> {
        fn field(&self, _: &[String]) -> Option<String> {
            Some(self.0.into())
        }
    }

    fn is(filter: &str, value: &str) -> bool {
        FilterSet::parse(&[filter]).unwrap().matches(&Fixed(value))
    }

    #[test]
    fn empty_filter_matches_everything() {
        for filters in [&[][..], &[""], &["", ""], &["name==nope", ""]] {
            let set = FilterSet::parse(filters).unwrap();
            assert!(set.is_always(), "{filters:?}");
            assert_eq!(eval(filters), "1111");
        }
        assert!(!FilterSet::parse(&["name"]).unwrap().is_always());
        assert_eq!(eval(&["name==foo", "name=="]), "ERR");
    }

    #[test]
    fn equal_operator_requires_presence() {
        check(&[
            ("name==foo", "1000"),
            ("kind==active", "1000"),
            ("kind==unknown", "0000"),
            (r#"parent=="""#, "1001"),
            (r#"labels.k=="""#, "0010"),
            (r#"labels.nope=="""#, "0000"),
            ("name==x=y", "0000"),
        ]);
    }

    #[test]
    fn not_equal_treats_absent_field_as_empty() {
        check(&[
            ("name!=foo", "0111"),
            (r#"parent!="""#, "0110"),
            ("kind!=active", "0111"),
            (r#"labels.k!="""#, "0000"),
            (r#"labels.nope!="""#, "0000"),
            ("nope!=x", "1111"),
        ]);
    }

    #[test]
    fn regex_operator_searches_unanchored_and_sees_absent_as_empty() {
        check(&[
            ("name~=fo+", "1000"),
            ("name~=^h.llo", "0010"),
            ("name~=héllo", "0010"),
            (r"name~=\bfoo\b", "1000"),
            ("kind~=^$", "0001"),
            (r#"kind~="""#, "1111"),
            ("labels.nope~=^$", "1111"),
            ("nope~=^$", "1111"),
        ]);
    }

    #[test]
    fn presence_test_follows_snapshot_adaptor() {
        check(&[
            ("name", "1111"),
            ("parent", "1111"),
            ("kind", "1110"),
            ("labels.k", "0010"),
            // Bare `labels` names the key "", and only when labels exist.
            ("labels", "0010"),
            ("labels==empty-key", "0010"),
            (r#"labels."""#, "0010"),
            ("nope", "0000"),
            // Only the first element selects name/kind/parent.
            ("name.foo", "1111"),
            ("name.foo==foo", "1000"),
            ("kind.x==active", "1000"),
        ]);
    }

    #[test]
    fn quoted_label_key_with_slash_matches() {
        check(&[
            (r#"labels."a/b""#, "0100"),
            (r#"labels."a/b"==c"#, "0100"),
            (r#"labels."containerd.io/gc.root""#, "0100"),
            ("labels.a/b", "ERR"),
            ("labels.containerd.io/gc.root", "ERR"),
        ]);
    }

    #[test]
    fn dotted_label_key_matches_quoted_or_split() {
        check(&[
            (r#"labels."x.y""#, "0100"),
            ("labels.x.y", "0100"),
            (r#"labels.x."y""#, "0100"),
            (r#"labels."x".y==z"#, "0100"),
            (r#"labels."a.b.c""#, "0001"),
            ("labels.a.b.c==1", "0001"),
        ]);
        let seen = std::cell::RefCell::new(Vec::new());
        struct Rec<'a>(&'a std::cell::RefCell<Vec<String>>);
        impl Fields for Rec<'_> {
            fn field(&self, path: &[String]) -> Option<String> {
                *self.0.borrow_mut() = path.to_vec();
                None
            }
        }
        FilterSet::parse(&[r#"labels."a/b".c"#])
            .unwrap()
            .matches(&Rec(&seen));
        assert_eq!(*seen.borrow(), ["labels", "a/b", "c"]);
    }

    #[test]
    fn escapes_in_quoted_strings_decode_like_go() {
        check(&[
            (r#"labels."tab\tkey"=="v\"q""#, "0010"),
            (r#"labels."\u00e9"=="\u00fc""#, "0001"),
            (r#"labels."\xc3\xa9""#, "0001"),
            (r#"labels."\303\251"==ü"#, "0001"),
            (r#"name=="h\u00e9llo w\u00f6rld""#, "0010"),
            // Bytes that are not UTF-8 equal nothing.
            (r#"name=="\377""#, "0000"),
            (r#"name!="\377""#, "1111"),
            (r#"labels."\xff""#, "0000"),
            (r#""name"==foo"#, "1000"),
        ]);
        assert!(is(
            r#"x=="\a\b\f\n\r\t\v\\\"""#,
            "\x07\x08\x0c\n\r\t\x0b\\\""
        ));
        assert!(is(r#"x=="\x41\101\u0041\U00000041""#, "AAAA"));
        assert!(is(r#"x=="\000""#, "\0"));
        assert!(
            is(r#"x=="\ud800""#, "\u{FFFD}"),
            "Go encodes surrogates as U+FFFD"
        );
    }

    #[rustfmt::skip]
    const MALFORMED_ESCAPES: &[&str] = &[
        r#"name=="\q""#, r#"name=="\'""#, r#"name=="\/""#, r#""na\me"==foo"#,
        // Too few digits, or a value out of range.
        r#"name=="\x4""#, r#"name=="\0""#, r#"name=="\400""#, r#"name=="\U00110000""#,
        // Only the delimiter in use may be escaped.
        r"name~=/a\|b/", r"name~=|a\/b|", r"name~=/\d/",
    ];

    #[test]
    fn malformed_escapes_are_rejected() {
        for input in MALFORMED_ESCAPES {
            assert_eq!(eval(&[input]), "ERR", "{input:?}");
        }
    }

    #[test]
    fn alt_quotes_are_only_for_regex_values() {
        check(&[
            ("name~=/^h.llo w/", "0010"),
            ("name~=|^h.llo w|", "0010"),
            (r"name~=|a\|b|", "0100"),
            (r"name~=/fo\/o/", "0000"),
            (r#"name~="\\w+""#, "1110"),
            ("name==/foo/", "ERR"),
            ("name!=|foo|", "ERR"),
            ("labels./a/", "ERR"),
            ("labels.|a|", "ERR"),
            // Inside an unquoted value they are ordinary characters.
            ("name==a/b", "0000"),
            ("name==a|b", "0000"),
            (r#"name==a"b"#, "0000"),
        ]);
    }

    #[test]
    fn comma_is_and_and_separate_filters_are_or() {
        check(&[
            ("name==foo,kind==active", "1000"),
            ("name==foo,kind==view", "0000"),
            ("kind,labels.k", "0010"),
        ]);
        assert_eq!(eval(&["name==foo", "name==bar"]), "1100");
        assert_eq!(eval(&["kind==view", "labels.x.y"]), "0110");
    }

    #[test]
    fn whitespace_is_skipped_only_before_tokens() {
        check(&[
            (" name==foo", "1000"),
            ("name == foo", "1000"),
            ("name\t==\tfoo", "1000"),
            ("name\n==foo", "1000"),
            ("name\u{3000}==foo", "1000"),
            ("name==foo, kind", "1000"),
            (r#"name == "foo""#, "1000"),
            (" ", "ERR"),
            ("name==foo ", "ERR"),
            ("name==foo\n", "ERR"),
            ("name==foo ,kind", "ERR"),
            ("name ", "ERR"),
            ("name==a b", "ERR"),
            (r#"name=="a" "#, "ERR"),
        ]);
    }

    #[rustfmt::skip]
    const MALFORMED: &[&str] = &[
        // Missing pieces.
        "name==", "==x", "labels.", "labels..a", "nope~=", "labels.k==", "name==x,", ",name",
        "name,,kind",
        // Operators are exactly two runes; a value cannot start with one, `.` or `,`.
        "name=x", "name===x", "name=!x", "name!!x", "name~x", "name==~x", "name==.a", "name==,a",
        // Stray runes after a field or a quoted string.
        "name@", "@name", "name\"x\"", r#"name=="a"b"#, r#"name=="a".b"#,
        // Unterminated quotes; a newline ends one too.
        "name~=/foo", r#"name=="foo"#, "name==\"fo\no\"",
    ];

    #[test]
    fn malformed_filters_are_rejected() {
        for input in MALFORMED {
            assert_eq!(eval(&[input]), "ERR", "{input:?}");
        }
    }

    #[test]
    fn field_names_are_ascii_word_characters() {
        check(&[
            ("0==x", "0000"),
            ("_a==x", "0000"),
            ("labels.0", "0000"),
            ("labels.é", "ERR"),
            (r#"labels."é""#, "0001"),
            (r#"labels."😀""#, "0000"),
        ]);
    }

    #[test]
    fn unicode_values_follow_go_rune_classes() {
        check(&[
            ("name==😀", "0000"),
            ("name==a😀", "0000"),
            ("name==@", "0000"),
            // The first rune of a value is taken whatever it is...
            ("name==\u{AD}x", "0000"),
            ("name==\u{1}", "0000"),
            // ...but later ones must be graphic.
            ("name==a\u{AD}", "ERR"),
            ("name==a\u{200D}", "ERR"),
            ("name==a\u{1}", "ERR"),
            ("name==a\u{E000}", "ERR"),
            ("name==a\u{E0001}", "ERR"),
            ("name==a\u{FDD0}", "ERR"),
            ("name==a\u{1FFFF}", "ERR"),
            ("name==a\u{2028}", "ERR"),
            // NUL and U+FFFD are rejected anywhere.
            ("name\0", "ERR"),
            ("name==a\0", "ERR"),
            ("name==\u{FFFD}", "ERR"),
            ("name==\"\u{FFFD}\"", "ERR"),
        ]);
    }

    #[test]
    fn invalid_regex_parses_but_never_matches() {
        check(&[
            ("name~=[", "0000"),
            (r#"nope~="[""#, "0000"),
            (r"name~=\C", "0000"),
        ]);
        assert!(!FilterSet::parse(&["x~=("]).unwrap().matches(&Fixed("(")));
        // An invalid-UTF-8 pattern cannot compile either.
        assert!(
            !FilterSet::parse(&[r#"x~="\xff""#])
                .unwrap()
                .matches(&Fixed(""))
        );
    }

    #[test]
    fn regex_perl_classes_are_ascii_like_go() {
        assert!(is(r"x~=^\d+$", "0123456789"));
        assert!(!is(r"x~=\d", "\u{663}"), "Arabic-Indic digit");
        assert!(!is(r"x~=\w", "é"));
        assert!(is(r"x~=^\W$", "é"));
        assert!(!is(r"x~=\s", "\u{3000}\u{b}"));
        assert!(
            !is(r"x~=\bé", "é"),
            "é is no word character, so no boundary"
        );
        assert!(is(r"x~=^[\w.]+$", "a_b.c"));
        assert!(is(r"x~=^[^\d\s]+$", "abc"));
        // Unicode `\w{64}` would exceed the size limit; ASCII does not.
        assert!(is(
            r"x~=^sha256:\w{64}$",
            &format!("sha256:{}", "ab12".repeat(16))
        ));
        // In Go a `[` inside a class is literal, and `&&`/`~~` are not operators.
        assert!(is(r"x~=^[[]$", "["));
        assert!(is(r"x~=^[a&&b]+$", "a&b"));
        assert!(is(r"x~=^[~~]$", "~"));
        assert!(is(r"x~=^[[:alpha:][:digit:]]+$", "a1"));
        assert!(is(r"x~=^[]a]+$", "]a"));
        assert!(is(r"x~=\\d", "\\d"));
    }

    #[test]
    fn distinct_regexes_are_capped() {
        let many = |n: usize, distinct: bool| {
            (0..n)
                .map(|i| format!("x~=a{}", if distinct { i } else { 0 }))
                .collect::<Vec<_>>()
        };
        assert!(FilterSet::parse(&many(MAX_REGEXES, true)).is_ok());
        assert!(FilterSet::parse(&many(10 * MAX_REGEXES, false)).is_ok());
        let err = FilterSet::parse(&[many(MAX_REGEXES + 1, true).join(",")]).unwrap_err();
        assert!(err.message.contains("regular expressions"), "{err}");
    }

    /// The fastest of three runs of `f`: the slower ones measure the
    /// machine's other work.
    fn fastest(mut f: impl FnMut()) -> std::time::Duration {
        (0..3)
            .map(|_| {
                let start = std::time::Instant::now();
                f();
                start.elapsed()
            })
            .min()
            .unwrap_or_default()
    }

    /// Asserts that `work(n)` takes time linear in `n`: eight times the
    /// input may take at most 32 times as long (quadratic work takes 64
    /// times, backtracking forever). Two timings on the same machine, so
    /// the check does not depend on its speed (emulated guests included).
    fn assert_linear(what: &str, n: usize, work: impl Fn(usize)) {
        let small = fastest(|| work(n));
        let large = fastest(|| work(8 * n));
        assert!(
            large <= small * 32,
            "{what}: {small:?} for {n}, {large:?} for {}: not linear",
            8 * n
        );
    }

    #[test]
    fn pathological_regex_is_bounded() {
        // Huge programs are refused by the size cap (and then never match)
        // instead of being built...
        for pattern in [r"(a{1000}){1000}", r"\w{1000}{1000}", r"a{100000}"] {
            assert!(compile_regex(pattern).is_none(), "{pattern} compiled");
            let set = FilterSet::parse(&[format!("x~={pattern}")]).unwrap();
            assert!(!set.matches(&Fixed(&"a".repeat(100_000))), "{pattern}");
        }
        // ...by our cap, not only the regex crate's own (ten times larger).
        let big = r"a{100000}";
        assert!(
            RegexBuilder::new(big)
                .size_limit(10 * REGEX_SIZE_LIMIT)
                .build()
                .is_ok()
        );
        // So is nesting too deep.
        let deep = format!("{}a{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(compile_regex(&deep).is_none());
        assert!(
            !FilterSet::parse(&[format!("x~={deep}")])
                .unwrap()
                .matches(&Fixed("a"))
        );
        // Nested stars compile, and match in time linear in the input.
        let nested = FilterSet::parse(&[r"x~=((((a*)*)*)*)*b"]).unwrap();
        let input = "a".repeat(8 << 17);
        assert_linear("nested stars", 1 << 17, |n| {
            assert!(!nested.matches(&Fixed(&input[..n])));
        });
        // An unterminated class full of "[:" (each could open a named
        // class) is rewritten and refused about as fast as one of plain
        // letters of the same length: no rescan for ":]" at every "[:"
        // (quadratic: 40 times as long at this length).
        let colons = format!("x~=[{}", "[:".repeat(50_000));
        let letters = format!("x~=[{}", "ab".repeat(50_000));
        let refuse = |filter: &str| {
            let set = FilterSet::parse(&[filter]).unwrap();
            assert!(!set.matches(&Fixed("[")));
        };
        let (hostile, plain) = (fastest(|| refuse(&colons)), fastest(|| refuse(&letters)));
        assert!(
            hostile <= plain * 10,
            "[: class: {hostile:?}, letters: {plain:?}"
        );
    }

    #[test]
    fn error_names_input_and_position() {
        let err = FilterSet::parse(&["kind", "name==a b"]).unwrap_err();
        assert_eq!(err.input, "name==a b");
        assert_eq!(
            err.to_string(),
            r#"invalid filter "name==a b": parse error at byte 7: unexpected input: ' '"#
        );
        let err = FilterSet::parse(&[r#"name=="\q""#]).unwrap_err();
        assert!(err.message.contains("illegal escape sequence"), "{err}");
    }

    fn arb_filter() -> impl Strategy<Value = String> {
        let piece = prop::sample::select(vec![
            "name", "labels", "kind", ".", ",", "==", "!=", "~=", "=", "\"", "/", "|", "\\", "\\x",
            "\\d", "\\w", "\\b", "[:", ":]", "]", "^", "&&", "\\u", "\\U", "\\0", "7", "f", " ",
            "\n", "é", "😀", "\u{AD}", "\0", "\u{FFFD}", "(", "[", "*", "{9}", "x",
        ]);
        prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn parse_and_match_never_panic(
            filters in prop::collection::vec(prop_oneof![any::<String>(), arb_filter()], 0..3),
            value in any::<String>(),
        ) {
            if let Ok(set) = FilterSet::parse(&filters) {
                let labels = BTreeMap::from([(value.clone(), value.clone())]);
                set.matches(&SnapshotFields { name: &value, parent: "", kind: "view", labels: &labels });
                set.matches(&Fixed("x"));
                prop_assert!(!set.is_always() || filters.is_empty() || filters.iter().any(String::is_empty));
            }
        }
    }
}
