//! The process's allocator: mimalloc. glibc malloc's per-request free/consolidate showed up as
//! ~8% of the proxy's CPU under load (perf); mimalloc's thread-local free lists avoid it.
//!
//! Not through the `mimalloc` crate's `GlobalAlloc`: it asks `mi_malloc_aligned` for every
//! allocation, and mimalloc serves an aligned request above 1 KiB whose size is not a power of
//! two by over-allocating, on its slow path, even for an alignment of 8. Per request that hit
//! the header maps and the boxed request pipeline: ~1.6k of ~28k instructions (callgrind).
//! Every mimalloc block is word-aligned (block sizes are multiples of 8 and pages are
//! aligned), which is all that almost every Rust type asks for; only larger alignments need the
//! aligned calls. (Not 16: a block of the 24-byte class is only 8-aligned, and small
//! reallocations land in such classes; the test below caught it.)

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// Alignment every `mi_malloc` block has, whatever its size (`MI_INTPTR_SIZE`).
const MALLOC_ALIGN: usize = 8;

/// mimalloc, with the plain calls for the alignments they guarantee.
pub struct MiMalloc;

#[allow(unsafe_code)]
// SAFETY: every block comes from mimalloc and goes back to it (`mi_free` takes blocks of both
// the plain and the aligned calls); plain calls serve only layouts whose alignment divides
// MALLOC_ALIGN, which every mimalloc block has; a null return is passed on as the failure.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain FFI calls with a size (and a power-of-two alignment from `Layout`).
        unsafe {
            if layout.align() <= MALLOC_ALIGN {
                mi::mi_malloc(layout.size()) as *mut u8
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe {
            if layout.align() <= MALLOC_ALIGN {
                mi::mi_zalloc(layout.size()) as *mut u8
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (GlobalAlloc's contract).
        unsafe { mi::mi_free(ptr as *mut c_void) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout` (GlobalAlloc's contract); the
        // block keeps its alignment class.
        unsafe {
            if layout.align() <= MALLOC_ALIGN {
                mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8
            } else {
                mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
            }
        }
    }
}

/// Return the memory freed on this thread (and by exited threads) to the OS now.
///
/// For after a configuration build: at 10k services the parse trees and config objects peak at
/// about twice the snapshot that stays, and mimalloc purges freed pages only lazily, when the
/// freeing thread allocates again; the build's thread then sleeps until the next change, so
/// without this the process kept its build peak as RSS (308 MiB at 10k services vs 172 MiB
/// after collecting, measured). Costs one pass over this thread's heap.
pub fn release_freed_memory() {
    #[allow(unsafe_code)]
    // SAFETY: a plain FFI call without pointers; valid on any thread at any time.
    unsafe {
        mi::mi_collect(true)
    }
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use super::*;

    /// Blocks of every size class honour their layout's alignment, through alloc, zeroed
    /// alloc and realloc (the plain calls' word alignment is what the shortcut rests on).
    #[test]
    fn blocks_are_aligned_as_asked() {
        let a = MiMalloc;
        for align in [1usize, 2, 8, 16, 32, 64, 4096] {
            for size in [1usize, 7, 24, 100, 1000, 1500, 5400, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero sizes; each block is freed with its layout.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "alloc {size} align {align}");
                    p.write_bytes(0xab, size);
                    let q = a.realloc(p, layout, size * 3);
                    assert_eq!(q as usize % align, 0, "realloc {size} align {align}");
                    assert_eq!(*q.add(size - 1), 0xab, "realloc keeps the contents");
                    a.dealloc(q, Layout::from_size_align(size * 3, align).unwrap());
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
