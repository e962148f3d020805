//! What is wrong with a pipeline file, where, and what to do about it.

use std::fmt;
use std::ops::Range;

/// One problem in a pipeline file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file, as the caller named it.
    pub file: String,
    /// 1-based line of the offending key or value.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// The field, e.g. `machine[2].policy` or `plan[0].step[1].machines[0]`; empty for a
    /// syntax error or a file that cannot be read.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    pub hint: String,
}

impl fmt::Display for Diagnostic {
    /// `FILE:LINE:COL: PATH: MESSAGE; HINT` (without `PATH: ` when the path is empty).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        write!(f, "{}; {}", self.message, self.hint)
    }
}

/// Every problem found in a pipeline file, in the order of their positions in the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diagnostics(Vec<Diagnostic>);

impl Diagnostics {
    /// How many problems there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The problems, in file order.
    pub fn iter(&self) -> std::slice::Iter<'_, Diagnostic> {
        self.0.iter()
    }

    /// The problems, in file order.
    pub fn as_slice(&self) -> &[Diagnostic] {
        &self.0
    }

    /// Sorted by position then path, duplicates removed.
    pub(crate) fn from_unsorted(mut all: Vec<Diagnostic>) -> Diagnostics {
        all.sort_by(|a, b| {
            (a.line, a.column, &a.path, &a.message).cmp(&(b.line, b.column, &b.path, &b.message))
        });
        all.dedup();
        Diagnostics(all)
    }
}

impl fmt::Display for Diagnostics {
    /// One diagnostic per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.0 {
            writeln!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl IntoIterator for Diagnostics {
    type Item = Diagnostic;
    type IntoIter = std::vec::IntoIter<Diagnostic>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a Diagnostics {
    type Item = &'a Diagnostic;
    type IntoIter = std::slice::Iter<'a, Diagnostic>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Collects diagnostics for one file, turning byte offsets into lines and columns.
pub(crate) struct Reporter<'s> {
    file: &'s str,
    source: &'s str,
    /// Byte offset of each line's start.
    line_starts: Vec<usize>,
    found: Vec<Diagnostic>,
}

impl<'s> Reporter<'s> {
    pub(crate) fn new(source: &'s str, file: &'s str) -> Reporter<'s> {
        let line_starts = std::iter::once(0)
            .chain(source.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Reporter {
            file,
            source,
            line_starts,
            found: Vec::new(),
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub(crate) fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.source.len());
        let line = self.line_starts.partition_point(|&s| s <= offset) - 1;
        let start = self.line_starts[line];
        let column = self
            .source
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        (line + 1, column + 1)
    }

    /// Reports a problem at the start of `span`.
    pub(crate) fn report(
        &mut self,
        span: Range<usize>,
        path: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        let (line, column) = self.position(span.start);
        self.found.push(Diagnostic {
            file: self.file.to_string(),
            line,
            column,
            path: path.into(),
            message: message.into(),
            hint: hint.into(),
        });
    }

    /// The source text of `span`.
    pub(crate) fn text(&self, span: Range<usize>) -> &'s str {
        self.source.get(span).unwrap_or("")
    }

    pub(crate) fn has_errors(&self) -> bool {
        !self.found.is_empty()
    }

    pub(crate) fn finish(self) -> Diagnostics {
        Diagnostics::from_unsorted(self.found)
    }
}
