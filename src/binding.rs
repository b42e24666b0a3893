//! The caller's buffers as bindings (a whole buffer or a range of one: arenas, a cache at an
//! offset), their checks against the device and the plan, and the bind groups a plan keeps per
//! set of bindings so that recording a call it has seen before creates nothing.

use std::sync::Mutex;

use crate::error::{Error, Result};

/// Anything that names a range of a buffer to bind: a whole `&wgpu::Buffer`, a
/// [`wgpu::BufferBinding`] (buffer, offset, size; `size: None` is the rest of the buffer) or a
/// [`wgpu::BufferSlice`].
pub trait IntoBinding<'a> {
    /// The binding this value names.
    fn into_binding(self) -> wgpu::BufferBinding<'a>;
}

impl<'a> IntoBinding<'a> for &'a wgpu::Buffer {
    fn into_binding(self) -> wgpu::BufferBinding<'a> {
        self.as_entire_buffer_binding()
    }
}

impl<'a> IntoBinding<'a> for wgpu::BufferBinding<'a> {
    fn into_binding(self) -> wgpu::BufferBinding<'a> {
        self
    }
}

impl<'a> IntoBinding<'a> for &wgpu::BufferBinding<'a> {
    fn into_binding(self) -> wgpu::BufferBinding<'a> {
        self.clone()
    }
}

impl<'a> IntoBinding<'a> for wgpu::BufferSlice<'a> {
    fn into_binding(self) -> wgpu::BufferBinding<'a> {
        wgpu::BufferBinding {
            buffer: self.buffer(),
            offset: self.offset(),
            size: wgpu::BufferSize::new(self.size()),
        }
    }
}

/// What the device allows of a storage binding, read once when a plan is made.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BindingLimits {
    /// `Limits::min_storage_buffer_offset_alignment`.
    pub offset_alignment: u32,
    /// The smaller of `max_storage_buffer_binding_size` and `max_buffer_size`.
    pub max_size: u64,
}

impl BindingLimits {
    pub fn of(device: &wgpu::Device) -> Self {
        let l = device.limits();
        BindingLimits {
            offset_alignment: l.min_storage_buffer_offset_alignment.max(1),
            max_size: l.max_storage_buffer_binding_size.min(l.max_buffer_size),
        }
    }

    /// Checks one storage binding the caller passes: `STORAGE` usage, an offset aligned to the
    /// device's `min_storage_buffer_offset_alignment`, a range inside the buffer, a size that is
    /// a multiple of 4 and within the device's binding limit, and at least `need` bytes. Returns
    /// the bound range's size.
    pub fn check(&self, field: &'static str, b: &wgpu::BufferBinding, need: u64) -> Result<u64> {
        let buf = b.buffer;
        if !buf.usage().contains(wgpu::BufferUsages::STORAGE) {
            return Err(Error::invalid(
                field,
                "a buffer with BufferUsages::STORAGE",
                format!("usage {:?}", buf.usage()),
            ));
        }
        let align = self.offset_alignment as u64;
        if !b.offset.is_multiple_of(align) {
            return Err(Error::invalid(
                field,
                format!(
                    "an offset that is a multiple of {align} (the device's min_storage_buffer_offset_alignment)"
                ),
                format!("offset {}", b.offset),
            ));
        }
        if b.offset > buf.size() {
            return Err(Error::invalid(
                field,
                format!("an offset within the buffer ({} bytes)", buf.size()),
                format!("offset {}", b.offset),
            ));
        }
        let size = b.size.map_or(buf.size() - b.offset, |s| s.get());
        if b.offset
            .checked_add(size)
            .is_none_or(|end| end > buf.size())
        {
            return Err(Error::invalid(
                field,
                format!(
                    "a range within the buffer ({} bytes from offset {})",
                    buf.size() - b.offset,
                    b.offset
                ),
                format!("size {size}"),
            ));
        }
        if size < need {
            return Err(Error::invalid(
                field,
                format!("at least {need} bytes"),
                format!("{size} bytes"),
            ));
        }
        if !size.is_multiple_of(4) {
            return Err(Error::invalid(
                field,
                "a bound size that is a multiple of 4 bytes (a storage binding's rule)",
                format!("{size} bytes"),
            ));
        }
        if size > self.max_size {
            return Err(Error::invalid(
                field,
                format!(
                    "a bound size of at most {} bytes (the device's max_storage_buffer_binding_size; pass a smaller `size`)",
                    self.max_size
                ),
                format!("{size} bytes"),
            ));
        }
        Ok(size)
    }
}

/// Refuses a binding the kernel writes (`written`) that shares its buffer with one it reads:
/// within one dispatch a buffer bound for writing cannot be bound for anything else.
pub(crate) fn check_written_alone(
    written: (&'static str, &wgpu::BufferBinding),
    read: &[(&'static str, Option<&wgpu::BufferBinding>)],
) -> Result<()> {
    if let Some((name, _)) = read
        .iter()
        .find(|(_, r)| r.is_some_and(|r| r.buffer == written.1.buffer))
    {
        return Err(Error::invalid(
            written.0,
            "a buffer the call reads nothing from (the kernel writes it, and a buffer bound for writing cannot also be bound for reading in one dispatch)",
            format!("the buffer of `{name}`"),
        ));
    }
    Ok(())
}

/// Refuses two written bindings whose ranges in one buffer overlap.
pub(crate) fn check_disjoint(
    a: (&'static str, &wgpu::BufferBinding, u64),
    b: (&'static str, &wgpu::BufferBinding, u64),
) -> Result<()> {
    if a.1.buffer == b.1.buffer && a.1.offset < b.1.offset + b.2 && b.1.offset < a.1.offset + a.2 {
        return Err(Error::invalid(
            b.0,
            format!("a range that does not overlap `{}`", a.0),
            format!(
                "bytes {}..{} of the buffer that holds `{}` at {}..{}",
                b.1.offset,
                b.1.offset + b.2,
                a.0,
                a.1.offset,
                a.1.offset + a.2
            ),
        ));
    }
    Ok(())
}

/// One bound range as a cache key: the buffer (a handle: cloning it allocates nothing), its
/// offset and its bound size.
type Bound = (wgpu::Buffer, u64, u64);

/// One bound range as the caller passes it, compared against the keys without cloning.
pub(crate) type Probe<'a> = (&'a wgpu::Buffer, u64, u64);

/// Bind groups kept per plan, one per set of bindings, most recent last.
pub(crate) const BIND_GROUP_CACHE: usize = 8;

/// The bind groups of one plan, keyed by the exact bindings (buffer, offset, size) in binding
/// order. A hit clones the bind group handle and allocates nothing; a miss makes the group with
/// `make` and keeps it, dropping the oldest past [`BIND_GROUP_CACHE`]. Keys hold the buffers,
/// so a buffer the caller drops stays alive until its set leaves the cache (or
/// [`BindGroupCache::clear`]).
#[derive(Default)]
pub(crate) struct BindGroupCache {
    sets: Mutex<Vec<(Vec<Bound>, wgpu::BindGroup)>>,
}

impl BindGroupCache {
    pub fn get_or_make(
        &self,
        probe: &[Probe<'_>],
        make: impl FnOnce() -> Result<wgpu::BindGroup>,
    ) -> Result<wgpu::BindGroup> {
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        let same = |key: &[Bound]| {
            key.len() == probe.len()
                && key
                    .iter()
                    .zip(probe)
                    .all(|(k, p)| &k.0 == p.0 && k.1 == p.1 && k.2 == p.2)
        };
        if let Some((_, bg)) = sets.iter().find(|(k, _)| same(k)) {
            return Ok(bg.clone());
        }
        let bg = make()?;
        if sets.len() == BIND_GROUP_CACHE {
            sets.remove(0);
        }
        let key = probe.iter().map(|&(b, o, s)| (b.clone(), o, s)).collect();
        sets.push((key, bg.clone()));
        Ok(bg)
    }

    /// Forgets every bind group (and so releases the caller's buffers they hold).
    pub fn clear(&self) {
        self.sets.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// A bind-group entry for `b` at `binding`.
pub(crate) fn entry<'a>(binding: u32, b: &wgpu::BufferBinding<'a>) -> wgpu::BindGroupEntry<'a> {
    wgpu::BindGroupEntry {
        binding,
        resource: wgpu::BindingResource::Buffer(b.clone()),
    }
}
