//! `alveolus data add-case`: a corrected case joins the site's dataset. The pair is checked
//! the way `data validate` checks a case (readable, same grid, label values the dataset's map
//! names, some label), the id must be new, and only then is a `[[case]]` appended to
//! `dataset.toml`, its other content and comments untouched, the file replaced atomically.

use std::io::Write;
use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, Item, Table, value};

use crate::dataset::{
    CaseReport, CaseSpec, DatasetError, DatasetSpec, Severity, Split, check_case,
};

#[derive(Debug, thiserror::Error)]
pub enum AddCaseError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("{}: a case with id {id:?} is already listed", .path.display())]
    Duplicate { path: PathBuf, id: String },
    #[error("{}: the case is not added: {}", .path.display(), problems(.report))]
    Refused {
        path: PathBuf,
        report: Box<CaseReport>,
    },
    #[error("{}: {message}", .path.display())]
    Write { path: PathBuf, message: String },
}

fn problems(report: &CaseReport) -> String {
    report
        .problems
        .iter()
        .filter(|p| p.severity == Severity::Error)
        .map(|p| p.message.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The case to add.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCase {
    pub id: String,
    pub image: PathBuf,
    pub labels: PathBuf,
    pub split: Split,
}

/// Adds `case` to the dataset described by `description` (a `dataset.toml`) after checking it;
/// returns its check report (which may carry warnings).
pub fn add_case(description: &Path, case: &NewCase) -> Result<CaseReport, AddCaseError> {
    let spec = DatasetSpec::open(description)?;
    if spec.kind != crate::dataset::SourceKind::Description {
        return Err(DatasetError::Description {
            path: description.to_path_buf(),
            message: "not a dataset.toml: cases are added to a dataset description".into(),
        }
        .into());
    }
    let path = spec.source.clone();
    if case.id.trim().is_empty() {
        return Err(AddCaseError::Write {
            path,
            message: "the case id is empty".into(),
        });
    }
    if spec.cases.iter().any(|c| c.id == case.id) {
        return Err(AddCaseError::Duplicate {
            path,
            id: case.id.clone(),
        });
    }
    let root = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let candidate = CaseSpec {
        id: case.id.clone(),
        image: absolute(&case.image),
        labels: Some(absolute(&case.labels)),
        split: case.split,
    };
    let (report, _) = check_case(&spec, &candidate, true);
    if !report.usable() {
        return Err(AddCaseError::Refused {
            path,
            report: Box::new(report),
        });
    }

    let write_err = |message: String| AddCaseError::Write {
        path: path.clone(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| write_err(e.to_string()))?;
    let mut document: DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| write_err(e.to_string()))?;
    let mut entry = Table::new();
    entry.insert("id", value(case.id.as_str()));
    entry.insert("image", value(relative_to(&candidate.image, &root)));
    entry.insert(
        "labels",
        value(relative_to(
            candidate.labels.as_deref().expect("set above"),
            &root,
        )),
    );
    entry.insert("split", value(case.split.to_string()));
    match document.get_mut("case") {
        Some(Item::ArrayOfTables(cases)) => cases.push(entry),
        _ => {
            return Err(write_err(
                "its `case` entries are not an array of [[case]] tables".into(),
            ));
        }
    }
    write_atomically(&path, document.to_string().as_bytes()).map_err(write_err)?;
    Ok(report)
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// `path` relative to `root` when it lies inside it (datasets move with their files), else as
/// it is.
fn relative_to(path: &Path, root: &Path) -> String {
    let root = absolute(root);
    path.strip_prefix(&root)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// Writes `bytes` beside `path`, flushes them to disk, then renames over `path`: a reader sees
/// the old file or the new one, never half of it.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut temporary = tempfile::NamedTempFile::new_in(dir).map_err(|e| e.to_string())?;
    temporary.write_all(bytes).map_err(|e| e.to_string())?;
    temporary.as_file().sync_all().map_err(|e| e.to_string())?;
    if let Ok(metadata) = std::fs::metadata(path) {
        let _ = temporary.as_file().set_permissions(metadata.permissions());
    }
    temporary.persist(path).map_err(|e| e.to_string())?;
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}
