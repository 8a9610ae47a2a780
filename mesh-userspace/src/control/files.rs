//! Local mode: objects from a YAML file or a directory of them, re-read when anything changes.
//!
//! Each file keeps its last good parse: while a file is being edited into an invalid state the
//! mesh keeps running on its previous content, and the error is reported.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::SystemTime,
};

use crate::api::objects::{ObjectSet, ParseError};

#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    #[error("cannot read objects from {path}: {source}; create it or pass --objects <file|dir>")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Watches `path` by polling modification times and sizes (cheap, works on every filesystem and
/// across editors' rename-on-save).
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    /// What the files looked like at the last read; `None` before the first (so that the first
    /// poll yields a set, an empty one for an empty directory).
    fingerprint: Option<Vec<(PathBuf, SystemTime, u64)>>,
    last_good: BTreeMap<PathBuf, ObjectSet>,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            fingerprint: None,
            last_good: BTreeMap::new(),
        }
    }

    /// Returns a new object set when anything changed since the last call, `None` otherwise.
    pub fn poll(&mut self) -> Result<Option<ObjectSet>, FileSourceError> {
        let files = self.files()?;
        let mut fingerprint = Vec::with_capacity(files.len());
        for f in &files {
            let meta = std::fs::metadata(f).map_err(|source| FileSourceError::Read {
                path: f.clone(),
                source,
            })?;
            fingerprint.push((
                f.clone(),
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            ));
        }
        if self.fingerprint.as_ref() == Some(&fingerprint) {
            return Ok(None);
        }
        self.fingerprint = Some(fingerprint);

        let mut merged = ObjectSet::default();
        self.last_good.retain(|p, _| files.contains(p));
        for f in &files {
            let name = f.display().to_string();
            let text = match std::fs::read_to_string(f) {
                Ok(t) => t,
                Err(e) => {
                    merged.errors.push(ParseError {
                        source_name: name,
                        document: 0,
                        message: e.to_string(),
                    });
                    continue;
                }
            };
            let mut set = ObjectSet::default();
            set.add_yaml(&name, &text);
            let failed = !set.errors.is_empty();
            merged.errors.append(&mut set.errors);
            // Keep the previous good content of a file that no longer parses.
            let chosen = if let (true, Some(prev)) = (failed, self.last_good.get(f)) {
                prev.clone()
            } else {
                self.last_good.insert(f.clone(), set.clone());
                set
            };
            merged.merge(chosen);
        }
        Ok(Some(merged))
    }

    fn files(&self) -> Result<Vec<PathBuf>, FileSourceError> {
        object_files(&self.path).map_err(|source| FileSourceError::Read {
            path: self.path.clone(),
            source,
        })
    }
}

/// The object files at `path`: the file itself, or a directory's `*.yaml`, `*.yml` and `*.json`
/// files, in name order.
///
/// # Errors
/// When `path` cannot be read.
pub fn object_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !std::fs::metadata(path)?.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| is_object_file(p))
        .collect();
    files.sort();
    Ok(files)
}

fn is_object_file(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_last_good_content_of_a_broken_file() {
        let dir = std::env::temp_dir().join(format!("weft-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.yaml");
        std::fs::write(
            &f,
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: one}\n",
        )
        .unwrap();
        let mut src = FileSource::new(&dir);
        let first = src.poll().unwrap().unwrap();
        assert_eq!(first.namespaces.len(), 1);
        assert!(
            src.poll().unwrap().is_none(),
            "unchanged files are not re-parsed"
        );

        std::fs::write(
            &f,
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: [broken\n",
        )
        .unwrap();
        let second = src.poll().unwrap().unwrap();
        assert_eq!(second.namespaces.len(), 1, "previous content kept");
        assert_eq!(second.errors.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
