//! imgstore's native read loop (docs/benchmarks.md, "First commit, session 11: the read loop in Rust").
//!
//! `read_files` reads a run of small regular files back to back into a caller's buffer and hashes each
//! with BLAKE3, all with the GIL released: the Python loop it replaces released and took back the GIL
//! five times a file (open, fstat, read, fstat, close), and on two cores the commit's three threads spent
//! a tenth of their CPU handing it over. It never decides anything: a file that is not exactly what the
//! walk saw (same inode, size, mtime and ctime, before and after the read) ends the run with None, and
//! Python reads that one itself, with its retries and its error messages.

use std::ffi::CString;

use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

struct Wanted {
    path: Option<CString>,
    ino: u64,
    size: usize,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn same(st: &libc::stat, w: &Wanted) -> bool {
    (st.st_mode & libc::S_IFMT) == libc::S_IFREG
        && st.st_ino == w.ino
        && st.st_size as usize == w.size
        && st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128 == w.mtime_ns
        && st.st_ctime as i128 * 1_000_000_000 + st.st_ctime_nsec as i128 == w.ctime_ns
}

/// Reads one file into `out` (exactly w.size bytes); its digest, or None if it is not what was wanted.
fn read_one(w: &Wanted, out: &mut [u8]) -> Option<[u8; 32]> {
    let path = w.path.as_ref()?;
    if w.size > out.len() {
        return None;
    }
    // SAFETY: plain system calls on a file descriptor this function owns and closes; `out` is a valid,
    // writable slice of at least w.size bytes.
    unsafe {
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK;
        let fd = libc::open(path.as_ptr(), flags);
        if fd < 0 {
            return None;
        }
        let mut before: libc::stat = std::mem::zeroed();
        let mut after: libc::stat = std::mem::zeroed();
        let mut n = 0usize;
        let mut ok = libc::fstat(fd, &mut before) == 0 && same(&before, w);
        while ok && n < w.size {
            let got = libc::read(fd, out.as_mut_ptr().add(n) as *mut libc::c_void, w.size - n);
            if got < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            if got <= 0 {
                ok = false;
            } else {
                n += got as usize;
            }
        }
        ok = ok && libc::fstat(fd, &mut after) == 0 && same(&after, w);
        libc::close(fd);
        if !ok {
            return None;
        }
    }
    Some(*blake3::hash(&out[..w.size]).as_bytes())
}

/// read_files(files, buf, offset, limit) -> list of 32-byte digests, then possibly one None.
///
/// `files`: (absolute path, st_ino, st_size, st_mtime_ns, st_ctime_ns) as the walk saw them. File i is
/// read into buf[offset:offset + size], the next one right after it, while offset < limit. The list
/// returned covers the files read, in order; a None in last place marks the file Python must read.
#[pyfunction]
fn read_files(py: Python<'_>, files: &PyList, buf: &PyAny, offset: usize, limit: usize) -> PyResult<PyObject> {
    let view = PyBuffer::<u8>::get(buf)?;
    if view.readonly() || !view.is_c_contiguous() {
        return Err(pyo3::exceptions::PyTypeError::new_err("read_files needs a writable, contiguous buffer"));
    }
    let mut wanted = Vec::with_capacity(files.len());
    for item in files.iter() {
        let (path, ino, size, mtime_ns, ctime_ns): (&[u8], u64, usize, i128, i128) = item.extract()?;
        wanted.push(Wanted { path: CString::new(path).ok(), ino, size, mtime_ns, ctime_ns });
    }
    let (base, len) = (view.buf_ptr() as usize, view.len_bytes());
    if offset > len {
        return Err(pyo3::exceptions::PyValueError::new_err("offset past the end of the buffer"));
    }
    let digests: Vec<Option<[u8; 32]>> = py.allow_threads(|| {
        // SAFETY: the buffer stays exported (and so neither freed nor resized) while `view` lives, which
        // is until this function returns; the caller does not touch it meanwhile (one block per thread).
        let whole = unsafe { std::slice::from_raw_parts_mut(base as *mut u8, len) };
        let mut out = Vec::with_capacity(wanted.len());
        let mut at = offset;
        for w in &wanted {
            if at >= limit {
                break;
            }
            let d = read_one(w, &mut whole[at..]);
            out.push(d);
            match d {
                Some(_) => at += w.size,
                None => break,
            }
        }
        out
    });
    drop(view);
    let list = PyList::empty(py);
    for d in digests {
        match d {
            Some(raw) => list.append(PyBytes::new(py, &raw))?,
            None => list.append(py.None())?,
        }
    }
    Ok(list.into())
}

#[pymodule]
fn _native(_py: Python<'_>, m: &PyModule) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(read_files, m)?)?;
    Ok(())
}
