//! imgstore's native loops (docs/benchmarks.md): commit's read loop ("First commit, session 11: the read loop
//! in Rust") and materialize's write loop ("First materialize, session 16: the write loop in Rust").
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

/// One file or symlink for write_files: where, what, and the metadata the manifest records.
struct Make {
    path: CString,
    target: Option<CString>, // a symlink's target; None for a regular file
    inner: usize,            // a file's content: block[inner..inner + size], whose BLAKE3 must be digest
    size: usize,
    digest: Vec<u8>,
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: libc::timespec,
    xattrs: Vec<(CString, Vec<u8>)>,
}

const PRIVILEGED_XATTRS: [&[u8]; 2] = [b"security.", b"trusted."];

fn wanted_xattrs<'a>(m: &'a Make, own: bool) -> impl Iterator<Item = &'a (CString, Vec<u8>)> {
    m.xattrs.iter().filter(move |(k, _)| own || !PRIVILEGED_XATTRS.iter().any(|p| k.as_bytes().starts_with(p)))
}

/// Writes all of `data` to fd (a new file: short writes are continued, EINTR retried).
///
/// SAFETY (of the caller): fd is an open descriptor.
unsafe fn write_all(fd: libc::c_int, data: &[u8]) -> bool {
    let mut n = 0usize;
    while n < data.len() {
        let got = libc::write(fd, data.as_ptr().add(n) as *const libc::c_void, data.len() - n);
        if got < 0 && *libc::__errno_location() == libc::EINTR {
            continue;
        }
        if got <= 0 {
            return false;
        }
        n += got as usize;
    }
    true
}

/// Makes one regular file below root_fd, as checkout.make_new does: content, then owner (which clears setuid
/// and capabilities), xattrs, mode, times. False (and nothing left behind) on any failure or a content that
/// does not hash to its digest.
fn make_file(root_fd: libc::c_int, block: &[u8], m: &Make, own: bool) -> bool {
    let content = match block.get(m.inner..m.inner + m.size) {
        Some(c) if blake3::hash(c).as_bytes()[..] == m.digest[..] => c,
        _ => return false,
    };
    // SAFETY: plain system calls on a descriptor this function owns and closes; the pointers passed are
    // valid NUL-terminated strings and slices that outlive the calls.
    unsafe {
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        let fd = libc::openat(root_fd, m.path.as_ptr(), flags, 0o600 as libc::c_uint);
        if fd < 0 {
            return false;
        }
        let mut ok = write_all(fd, content) && (!own || libc::fchown(fd, m.uid, m.gid) == 0);
        for (k, v) in wanted_xattrs(m, own) {
            ok = ok && libc::fsetxattr(fd, k.as_ptr(), v.as_ptr() as *const libc::c_void, v.len(), 0) == 0;
        }
        ok = ok && libc::fchmod(fd, m.mode as libc::mode_t) == 0;
        let times = [m.mtime, m.mtime];
        ok = ok && libc::futimens(fd, times.as_ptr()) == 0;
        ok = libc::close(fd) == 0 && ok;
        if !ok {
            libc::unlinkat(root_fd, m.path.as_ptr(), 0);
        }
        ok
    }
}

/// Makes one symlink below root_fd, as checkout.make_new does: owner, xattrs (through /proc: there is no
/// lsetxattrat), times, none of them following it.
fn make_symlink(root_fd: libc::c_int, m: &Make, target: &CString, own: bool) -> bool {
    // SAFETY: as in make_file; no descriptor is opened.
    unsafe {
        if libc::symlinkat(target.as_ptr(), root_fd, m.path.as_ptr()) != 0 {
            return false;
        }
        let nofollow = libc::AT_SYMLINK_NOFOLLOW;
        let mut ok = !own || libc::fchownat(root_fd, m.path.as_ptr(), m.uid, m.gid, nofollow) == 0;
        let mut xattrs = wanted_xattrs(m, own).peekable();
        if ok && xattrs.peek().is_some() {
            let mut via = format!("/proc/self/fd/{}/", root_fd).into_bytes();
            via.extend_from_slice(m.path.as_bytes());
            match CString::new(via) {
                Ok(via) => {
                    for (k, v) in xattrs {
                        ok = ok
                            && libc::lsetxattr(via.as_ptr(), k.as_ptr(), v.as_ptr() as *const libc::c_void, v.len(), 0)
                                == 0;
                    }
                }
                Err(_) => ok = false,
            }
        }
        let times = [m.mtime, m.mtime];
        ok = ok && libc::utimensat(root_fd, m.path.as_ptr(), times.as_ptr(), nofollow) == 0;
        if !ok {
            libc::unlinkat(root_fd, m.path.as_ptr(), 0);
        }
        ok
    }
}

type MakeItem<'a> = (&'a [u8], Option<&'a [u8]>, usize, usize, &'a [u8], u32, u32, u32, i64, Vec<(&'a [u8], &'a [u8])>);

/// write_files(root_fd, block, entries, own) -> how many of the entries were made, in order.
///
/// `entries`: (path below root_fd, symlink target or None, offset of the content in `block`, size, BLAKE3
/// digest (32 bytes), uid, gid, mode, mtime_ns, xattrs). A regular file's content is `block[offset:offset +
/// size]`. Owner and privileged xattrs are set only if `own`. It never decides anything: the first entry it
/// cannot make exactly (an error of any kind, a content that does not hash to its digest) stops the run,
/// and is left for Python to make, with its error messages; nothing of it is left behind.
#[pyfunction]
fn write_files(py: Python<'_>, root_fd: i32, block: &PyAny, entries: &PyList, own: bool) -> PyResult<usize> {
    let view = PyBuffer::<u8>::get(block)?;
    if !view.is_c_contiguous() {
        return Err(pyo3::exceptions::PyTypeError::new_err("write_files needs a contiguous buffer"));
    }
    let mut makes = Vec::with_capacity(entries.len());
    for item in entries.iter() {
        let (path, target, inner, size, digest, uid, gid, mode, mtime_ns, xattrs): MakeItem = item.extract()?;
        // A name with a NUL byte ends the run here: Python refuses it with its own message.
        let path = match CString::new(path) {
            Ok(path) => path,
            Err(_) => break,
        };
        let target = match target.map(CString::new).transpose() {
            Ok(target) => target,
            Err(_) => break,
        };
        let named: Result<Vec<(CString, Vec<u8>)>, _> =
            xattrs.into_iter().map(|(k, v)| CString::new(k).map(|k| (k, v.to_vec()))).collect();
        let named = match named {
            Ok(named) => named,
            Err(_) => break,
        };
        let mtime = libc::timespec {
            tv_sec: mtime_ns.div_euclid(1_000_000_000) as libc::time_t,
            tv_nsec: mtime_ns.rem_euclid(1_000_000_000) as libc::c_long,
        };
        makes.push(Make { path, target, inner, size, digest: digest.to_vec(), uid, gid, mode, mtime, xattrs: named });
    }
    let (base, len) = (view.buf_ptr() as usize, view.len_bytes());
    let made = py.allow_threads(|| {
        // SAFETY: the buffer stays exported (neither freed nor resized) while `view` lives, which is until this
        // function returns; it is only read.
        let block = unsafe { std::slice::from_raw_parts(base as *const u8, len) };
        makes
            .iter()
            .take_while(|m| match &m.target {
                Some(target) => make_symlink(root_fd, m, target, own),
                None => make_file(root_fd, block, m, own),
            })
            .count()
    });
    drop(view);
    Ok(made)
}

#[pymodule]
fn _native(_py: Python<'_>, m: &PyModule) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(read_files, m)?)?;
    m.add_function(wrap_pyfunction!(write_files, m)?)?;
    Ok(())
}
