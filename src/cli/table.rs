//! A small aligned text table: a header row of upper-case names, columns
//! separated by three spaces, text left-aligned and figures right-aligned,
//! no trailing spaces. Enough for a terminal and for `column`-minded
//! scripts; machine readers use `--json`.

/// How a column's cells line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Text: padded on the right.
    Left,
    /// Figures: padded on the left, so units and digits line up.
    Right,
}

/// A table being built row by row.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<&'static str>,
    aligns: Vec<Align>,
    rows: Vec<Vec<String>>,
}

const GAP: &str = "   ";

impl Table {
    /// A table with these columns.
    pub fn new(columns: &[(&'static str, Align)]) -> Table {
        Table {
            headers: columns.iter().map(|(h, _)| *h).collect(),
            aligns: columns.iter().map(|(_, a)| *a).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty, extra cells are dropped.
    pub fn row(&mut self, mut cells: Vec<String>) {
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    /// Number of rows (the header not counted).
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as lines, each ending in a newline; the header is written
    /// even when there are no rows, so an empty listing still says what it
    /// would have shown.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str(GAP);
                }
                let pad = widths[i] - width(cell);
                match self.aligns[i] {
                    Align::Left => {
                        line.push_str(cell);
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(cell);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Display width of a cell, counted in characters: keys and labels are
/// nearly always ASCII, and a wide character only misaligns its own row.
fn width(s: &str) -> usize {
    s.chars().count()
}

/// Key/value lines with the values aligned after the longest key
/// (`inspect`, `status`, footers).
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| width(k)).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let line = format!("{k}:{}{v}", " ".repeat(w - width(k) + 2));
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_text_left_and_figures_right() {
        let mut t = Table::new(&[
            ("ID", Align::Right),
            ("KEY", Align::Left),
            ("SIZE", Align::Right),
        ]);
        t.row(vec!["1".into(), "base".into(), "4.0 MiB".into()]);
        t.row(vec!["12".into(), "c".into(), "512 B".into()]);
        assert_eq!(
            t.render(),
            "ID   KEY       SIZE\n 1   base   4.0 MiB\n12   c        512 B\n"
        );
    }

    #[test]
    fn an_empty_table_still_has_its_header_and_no_trailing_spaces() {
        let mut t = Table::new(&[("KEY", Align::Left), ("PARENT", Align::Left)]);
        assert_eq!(t.render(), "KEY   PARENT\n");
        t.row(vec!["a-long-key".into()]);
        assert_eq!(t.render(), "KEY          PARENT\na-long-key\n");
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn key_values_line_up() {
        assert_eq!(
            key_values(&[("id", "7".into()), ("parent", String::new())]),
            "id:      7\nparent:\n"
        );
    }
}
