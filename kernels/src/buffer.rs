//! Large weight buffers.

/// Zero-initialised bytes that, on Linux, sit in their own anonymous mapping advised onto
/// transparent huge pages (`MADV_HUGEPAGE`).
///
/// Decoding streams every weight once per token. On 4 KiB pages each page of that stream is a TLB
/// miss, and in a virtual machine a miss is a two-level page walk; 2 MiB pages make them 512
/// times rarer. (Most distributions enable THP only where asked, as here.)
pub struct LargeBuffer {
    #[cfg(target_os = "linux")]
    map: Option<memmap2::MmapMut>,
    heap: Vec<u8>,
}

impl LargeBuffer {
    /// Below this a buffer is a plain heap allocation: no huge page would fill.
    #[cfg(target_os = "linux")]
    const MAPPED_FROM: usize = 2 << 20;

    pub fn zeroed(len: usize) -> Self {
        #[cfg(target_os = "linux")]
        if len >= Self::MAPPED_FROM {
            if let Ok(map) = memmap2::MmapMut::map_anon(len) {
                // Advice only: without THP the mapping still works, on small pages.
                let _ = map.advise(memmap2::Advice::HugePage);
                return Self {
                    map: Some(map),
                    heap: Vec::new(),
                };
            }
        }
        Self {
            #[cfg(target_os = "linux")]
            map: None,
            heap: vec![0; len],
        }
    }
}

impl std::ops::Deref for LargeBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        #[cfg(target_os = "linux")]
        if let Some(m) = &self.map {
            return m;
        }
        &self.heap
    }
}

impl std::ops::DerefMut for LargeBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        #[cfg(target_os = "linux")]
        if let Some(m) = &mut self.map {
            return m;
        }
        &mut self.heap
    }
}

impl Clone for LargeBuffer {
    fn clone(&self) -> Self {
        let mut b = Self::zeroed(self.len());
        b.copy_from_slice(self);
        b
    }
}
