//! Output folders written whole or not at all: everything goes into a hidden sibling folder,
//! which takes the folder's name only when complete; an existing folder with results is
//! refused unless forced, and then replaced only by a complete new one.

use std::path::Path;

use super::{OutputError, write_err};

/// A case id as a folder name: anything but letters, digits, `.`, `-` and `_` becomes `_`.
pub(super) fn folder_name(id: &str) -> String {
    let name: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.starts_with('.') || name.is_empty() {
        format!("_{name}")
    } else {
        name
    }
}

pub(super) fn has_entries(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
}

pub(super) fn refuse_results(out: &Path, force: bool) -> Result<(), OutputError> {
    if out.is_file() || (!force && out.is_dir() && has_entries(out)) {
        return Err(OutputError::Exists(out.to_path_buf()));
    }
    Ok(())
}

/// Runs `write` into a fresh hidden folder beside `folder` and, if it succeeds, puts that
/// folder in `folder`'s place (replacing what was there); if it fails, removes it.
pub(super) fn commit<T>(
    folder: &Path,
    write: impl FnOnce(&Path) -> Result<T, OutputError>,
) -> Result<T, OutputError> {
    let parent = folder
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(write_err(parent))?;
    let name = folder
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let staging = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging).map_err(write_err(&staging))?;
    let value = match write(&staging) {
        Ok(value) => value,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    if folder.exists() {
        let old = parent.join(format!(".{name}.replaced-{}", std::process::id()));
        std::fs::rename(folder, &old).map_err(write_err(folder))?;
        std::fs::rename(&staging, folder).map_err(write_err(folder))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&staging, folder).map_err(write_err(folder))?;
    }
    Ok(value)
}
