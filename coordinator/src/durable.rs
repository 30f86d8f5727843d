//! Durable file writes: write to a temporary sibling, fsync, rename over the target, fsync the
//! folder. A crash leaves either the old file or the new one, never a torn one.

use std::io::Write;
use std::path::Path;

pub fn write_atomic(path: &Path, contents: &[u8], secret: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let written = write_file(&tmp, contents, secret).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        // A full disk must not also keep the half-written copy.
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

fn write_file(tmp: &Path, contents: &[u8], secret: bool) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(tmp)?;
    file.write_all(contents)?;
    file.sync_all()
}
