//! The policy language: reading `.rl` files into syntax trees, with every problem located.
//!
//! The grammar is `grammar/policy.pest`; [`parser`] turns pest's output into the [`ast`], and
//! recovers after a syntax error so that one run reports every broken item.

pub mod ast;
mod depth;
pub mod parser;

use std::path::{Path, PathBuf};

use crate::diagnostic::{PolicyError, SourceFile};

pub use ast::PolicyFile;

/// One parsed policy file.
#[derive(Debug, Clone)]
pub struct ParsedFile {
    /// The file's name and text.
    pub source: SourceFile,
    /// The directory its imports are relative to.
    pub dir: PathBuf,
    /// The namespace used when the file names none: its stem.
    pub stem: String,
    /// Its syntax tree (what could be parsed of it).
    pub ast: PolicyFile,
}

/// Every policy file of a deployment, parsed, with the problems found so far.
#[derive(Debug, Default)]
pub struct PolicySet {
    files: Vec<ParsedFile>,
    errors: Vec<PolicyError>,
}

impl PolicySet {
    /// Reads and parses `.rl` files: each path is a file, or a directory whose `*.rl` files are
    /// read in name order. Problems (unreadable files, syntax errors) are kept, not returned,
    /// so that [`compile`](crate::compile) reports them with everything else.
    pub fn load<P: AsRef<Path>>(paths: &[P]) -> PolicySet {
        let mut set = PolicySet::default();
        for path in paths {
            let path = path.as_ref();
            match collect_files(path) {
                Ok(files) if files.is_empty() => set.errors.push(PolicyError::whole_file(
                    &path.display().to_string(),
                    format!("no `.rl` files in `{}`", path.display()),
                )),
                Ok(files) => {
                    for file in files {
                        set.load_file(&file);
                    }
                }
                Err(e) => set.errors.push(PolicyError::whole_file(
                    &path.display().to_string(),
                    format!("cannot read `{}`: {e}", path.display()),
                )),
            }
        }
        set
    }

    /// Parses policies given as `(name, text)` pairs; imports are relative to the current
    /// directory.
    pub fn from_sources<N, T>(sources: impl IntoIterator<Item = (N, T)>) -> PolicySet
    where
        N: AsRef<str>,
        T: AsRef<str>,
    {
        let mut set = PolicySet::default();
        for (name, text) in sources {
            set.add(
                SourceFile::new(name.as_ref(), text.as_ref()),
                PathBuf::from("."),
            );
        }
        set
    }

    fn load_file(&mut self, path: &Path) {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
                self.add(SourceFile::new(path.display().to_string(), text), dir);
            }
            Err(e) => self.errors.push(PolicyError::whole_file(
                &path.display().to_string(),
                format!("cannot read `{}`: {e}", path.display()),
            )),
        }
    }

    fn add(&mut self, source: SourceFile, dir: PathBuf) {
        let (ast, errors) = parser::parse(&source);
        let stem = Path::new(source.name())
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "default".to_owned());
        self.errors.extend(errors);
        self.files.push(ParsedFile {
            source,
            dir,
            stem,
            ast,
        });
    }

    /// The parsed files, in load order.
    pub fn files(&self) -> &[ParsedFile] {
        &self.files
    }

    /// Problems found while reading and parsing.
    pub fn errors(&self) -> &[PolicyError] {
        &self.errors
    }
}

fn collect_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        // Reading it reports a missing file with the operating system's words.
        std::fs::metadata(path)?;
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let file = entry?.path();
        // Hidden files are editors' and tools' (`.#api.rl`, a ConfigMap's `..data`), not
        // policies.
        let hidden = file
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if !hidden && file.extension().is_some_and(|e| e == "rl") && file.is_file() {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}
