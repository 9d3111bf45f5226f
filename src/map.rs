//! `chainfs map`: which layer holds each run of the virtual disk, as text,
//! JSON, or an SVG picture of the chain.
//!
//! Runs come from the resolver (`crate::image::resolve_span` over all
//! layers), one run at a time, and are coalesced with the previous run when
//! they continue it: same layer at the next file offset, or both zero, or
//! both unallocated. They are handed to a callback as they are found, so a
//! 2 TiB disk with millions of runs is printed in constant memory.
//!
//! Zero: a run no layer stores data for reads as zeros (`zero: true,
//! data: false`, as `qemu-img map --output=json` says of it). The drivers
//! answer "zero" both for a base's unallocated block and for a block a layer
//! declares zero (a VHDX zero state), so the map does not tell them apart.
//!
//! The SVG: the virtual disk is cut into `bins` equal columns. The top row,
//! "visible", colours each column by the layer that supplies most of its
//! bytes through the chain (white: all zero). Below it one row per layer,
//! leaf first, shades each column by how much of it that layer *stores*
//! itself, whether or not a child hides it (a layer's map(), not the
//! chain's). Both come from walking extents, never sectors, so a sparse
//! 2 TiB chain takes as many steps as it has runs.

use std::io::Write;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::format::{Extent, Layer};
use crate::image::{resolve_span, Span};
use crate::size::human;

/// Where one run of the virtual disk comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Stored in `layers[depth]` at `file_offset`.
    Data { depth: usize, file_offset: u64 },
    /// Held by `layers[depth]` in a form it decodes (compressed).
    Encoded { depth: usize },
    /// No layer stores it (or one declares it zero): reads as zeros.
    Zero,
}

impl Held {
    /// The layer that supplies the bytes, if any.
    pub fn depth(&self) -> Option<usize> {
        match *self {
            Held::Data { depth, .. } | Held::Encoded { depth } => Some(depth),
            Held::Zero => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub length: u64,
    pub held: Held,
}

impl Run {
    /// Does `next` continue this run (so the two print as one)?
    fn continued_by(&self, next: &Run) -> bool {
        self.start + self.length == next.start
            && match (self.held, next.held) {
                (
                    Held::Data {
                        depth: a,
                        file_offset: fa,
                    },
                    Held::Data {
                        depth: b,
                        file_offset: fb,
                    },
                ) => a == b && fa + self.length == fb,
                (x, y) => x == y,
            }
    }
}

/// Call `f` with each run of `[0, size)`, in order, coalesced.
pub fn runs(
    layers: &[Arc<dyn Layer>],
    size: u64,
    mut f: impl FnMut(&Run) -> Result<()>,
) -> Result<()> {
    let mut off = 0u64;
    let mut cur: Option<Run> = None;
    while off < size {
        let (span, n) = resolve_span(layers, 0, layers.len(), off, size - off)?;
        let n = n.min(size - off);
        if n == 0 {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("the chain maps an empty run at offset {off}"),
            ));
        }
        let held = match span {
            Span::Data { depth, file_offset } => Held::Data { depth, file_offset },
            Span::Encoded { depth } => Held::Encoded { depth },
            Span::Zero | Span::Below => Held::Zero,
        };
        let run = Run {
            start: off,
            length: n,
            held,
        };
        match &mut cur {
            Some(c) if c.continued_by(&run) => c.length += n,
            _ => {
                if let Some(c) = cur.take() {
                    f(&c)?;
                }
                cur = Some(run);
            }
        }
        off += n;
    }
    if let Some(c) = cur {
        f(&c)?;
    }
    Ok(())
}

fn io(e: std::io::Error) -> Error {
    Error::new(ErrorKind::Io, format!("cannot write the map: {e}"))
}

/// The text form, one run a line, like `qemu-img map` but listing every run.
pub fn write_text(layers: &[Arc<dyn Layer>], size: u64, out: &mut dyn Write) -> Result<()> {
    writeln!(
        out,
        "{:<18} {:<18} {:<6} {:<18} File",
        "Offset", "Length", "Depth", "Mapped to"
    )
    .map_err(io)?;
    runs(layers, size, |r| {
        let (depth, mapped, file) = match r.held {
            Held::Data { depth, file_offset } => (
                depth.to_string(),
                format!("{file_offset:#x}"),
                layers[depth].path().display().to_string(),
            ),
            Held::Encoded { depth } => (
                depth.to_string(),
                "encoded".into(),
                layers[depth].path().display().to_string(),
            ),
            Held::Zero => ("-".into(), "-".into(), "zero".into()),
        };
        writeln!(
            out,
            "{:<#18x} {:<#18x} {depth:<6} {mapped:<18} {file}",
            r.start, r.length
        )
        .map_err(io)
    })
}

/// The JSON form: an array of `{start, length, depth, file, offset, zero,
/// data}`, written one object a line as the runs are found.
pub fn write_json(layers: &[Arc<dyn Layer>], size: u64, out: &mut dyn Write) -> Result<()> {
    let mut first = true;
    write!(out, "[").map_err(io)?;
    runs(layers, size, |r| {
        let v = match r.held {
            Held::Data { depth, file_offset } => serde_json::json!({
                "start": r.start, "length": r.length, "depth": depth,
                "file": layers[depth].path().display().to_string(),
                "offset": file_offset, "zero": false, "data": true,
            }),
            Held::Encoded { depth } => serde_json::json!({
                "start": r.start, "length": r.length, "depth": depth,
                "file": layers[depth].path().display().to_string(),
                "offset": null, "zero": false, "data": true, "encoded": true,
            }),
            Held::Zero => serde_json::json!({
                "start": r.start, "length": r.length, "depth": null,
                "file": null, "offset": null, "zero": true, "data": false,
            }),
        };
        let sep = if first { "\n" } else { ",\n" };
        first = false;
        write!(out, "{sep}{v}").map_err(io)
    })?;
    writeln!(out, "\n]").map_err(io)
}

/// Add `[start, start+len)` to per-bin byte counts.
fn add_to_bins(bins: &mut [u64], bin_size: u64, start: u64, len: u64) {
    let end = start + len;
    let mut off = start;
    while off < end {
        let b = ((off / bin_size) as usize).min(bins.len() - 1);
        let bin_end = ((b as u64 + 1) * bin_size).max(off + 1);
        let n = end.min(bin_end) - off;
        bins[b] += n;
        off += n;
    }
}

/// How the SVG was drawn (for `--json`-less callers and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SvgStats {
    pub bins: usize,
    pub rows: usize,
}

const PALETTE: [&str; 8] = [
    "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn colour(depth: usize) -> &'static str {
    PALETTE[depth % PALETTE.len()]
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Draw the chain as SVG into `out`, the disk cut into `bins` columns.
pub fn write_svg(
    layers: &[Arc<dyn Layer>],
    size: u64,
    bins: usize,
    out: &mut dyn Write,
) -> Result<SvgStats> {
    let bins = bins.clamp(1, 100_000).min(size.max(1) as usize);
    let bin_size = size.div_ceil(bins as u64).max(1);
    // What each layer stores, walking its own map.
    let mut stored = vec![vec![0u64; bins]; layers.len()];
    for (depth, layer) in layers.iter().enumerate() {
        let mut off = 0;
        while off < size {
            let e = layer.map(off, size - off)?;
            let n = e.len().min(size - off);
            if n == 0 {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!("{}: empty extent at offset {off}", layer.path().display()),
                ));
            }
            if let Extent::Data { .. } | Extent::Encoded { .. } = e {
                add_to_bins(&mut stored[depth], bin_size, off, n);
            }
            off += n;
        }
    }
    // What the chain shows: bytes per bin per supplying layer.
    let mut visible = vec![vec![0u64; bins]; layers.len()];
    runs(layers, size, |r| {
        if let Some(depth) = r.held.depth() {
            add_to_bins(&mut visible[depth], bin_size, r.start, r.length);
        }
        Ok(())
    })?;

    let label_w = 220.0;
    let plot_w = 1100.0;
    let cell = plot_w / bins as f64;
    let row_h = 30.0;
    let top = 50.0;
    let rows = layers.len() + 1;
    let axis_y = top + rows as f64 * row_h + 6.0;
    let legend_y = axis_y + 40.0;
    let width = label_w + plot_w + 30.0;
    let height = legend_y + 30.0;
    let w = |out: &mut dyn Write, s: String| out.write_all(s.as_bytes()).map_err(io);

    w(out, format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" \
         width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" \
         font-family=\"sans-serif\" font-size=\"13\">\n\
         <rect x=\"0\" y=\"0\" width=\"{width}\" height=\"{height}\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"24\" font-size=\"16\">{} — {} layers, {} virtual, {} bins of {}</text>\n",
        esc(&layers.first().map(|l| l.path().display().to_string()).unwrap_or_default()),
        layers.len(),
        human(size),
        bins,
        human(bin_size),
    ))?;

    // One row: cells coalesced while their shade and colour stay the same.
    let row = |out: &mut dyn Write,
               y: f64,
               label: &str,
               cells: &dyn Fn(usize) -> Option<(&'static str, u32)>|
     -> Result<()> {
        w(out, format!(
            "<g class=\"row\"><text x=\"10\" y=\"{:.1}\">{}</text>\n<rect x=\"{label_w}\" y=\"{y:.1}\" width=\"{plot_w}\" height=\"{:.1}\" fill=\"#f4f4f4\" stroke=\"#bbb\"/>\n",
            y + row_h * 0.65,
            esc(label),
            row_h - 4.0
        ))?;
        let mut b = 0;
        while b < bins {
            let c = cells(b);
            let mut e = b + 1;
            while e < bins && cells(e) == c {
                e += 1;
            }
            if let Some((fill, pct)) = c {
                w(out, format!(
                    "<rect x=\"{:.2}\" y=\"{y:.1}\" width=\"{:.2}\" height=\"{:.1}\" fill=\"{fill}\" fill-opacity=\"{:.2}\"/>\n",
                    label_w + b as f64 * cell,
                    // At least 1.5 units wide, so one bin stays visible.
                    ((e - b) as f64 * cell).max(1.5),
                    row_h - 4.0,
                    pct as f64 / 100.0
                ))?;
            }
            b = e;
        }
        w(out, "</g>\n".into())
    };
    // Opacity from the held fraction in steps of 10 %, at least 50 % so a
    // bin holding one sector still shows.
    let shade = |held: u64, bin: usize| -> u32 {
        let span = bin_size.min(size - bin as u64 * bin_size).max(1);
        let pct = (held * 100).div_ceil(span).min(100) as u32;
        50 + pct.div_ceil(10) * 5
    };
    row(out, top, "visible (supplier)", &|b| {
        let (depth, held) = (0..layers.len())
            .map(|d| (d, visible[d][b]))
            .max_by_key(|&(d, n)| (n, std::cmp::Reverse(d)))?;
        (held > 0).then(|| (colour(depth), 100))
    })?;
    for (depth, layer) in layers.iter().enumerate() {
        let name = layer
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let s = &stored[depth];
        row(
            out,
            top + (depth + 1) as f64 * row_h,
            &format!("{depth}: {name}"),
            &|b| (s[b] > 0).then(|| (colour(depth), shade(s[b], b))),
        )?;
    }
    // Axis: five ticks with human offsets.
    for i in 0..=4u64 {
        let x = label_w + plot_w * i as f64 / 4.0;
        let at = size / 4 * i;
        w(out, format!(
            "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#555\"/>\n<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            axis_y - 6.0,
            axis_y + 4.0,
            axis_y + 20.0,
            if i == 4 { human(size) } else { human(at) }
        ))?;
    }
    // Legend.
    let mut x = 10.0;
    for (depth, layer) in layers.iter().enumerate() {
        let name = layer
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        w(out, format!(
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"14\" height=\"14\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            legend_y - 11.0,
            colour(depth),
            x + 18.0,
            legend_y,
            esc(&format!("{depth}: {name}"))
        ))?;
        x += 40.0 + 8.0 * (name.len() as f64 + 3.0);
    }
    w(out, format!(
        "<text x=\"{x:.1}\" y=\"{legend_y:.1}\" fill=\"#555\">paler = less of the bin stored; grey = nothing stored there</text>\n</svg>\n"
    ))?;
    Ok(SvgStats { bins, rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_split_runs_at_bin_edges() {
        let mut b = vec![0u64; 4];
        add_to_bins(&mut b, 10, 5, 20);
        assert_eq!(b, vec![5, 10, 5, 0]);
        add_to_bins(&mut b, 10, 38, 5);
        assert_eq!(b, vec![5, 10, 5, 5]);
    }

    #[test]
    fn runs_coalesce_only_when_continued() {
        let a = Run {
            start: 0,
            length: 10,
            held: Held::Data {
                depth: 1,
                file_offset: 100,
            },
        };
        let next = |s, h| Run {
            start: s,
            length: 5,
            held: h,
        };
        assert!(a.continued_by(&next(
            10,
            Held::Data {
                depth: 1,
                file_offset: 110
            }
        )));
        assert!(!a.continued_by(&next(
            10,
            Held::Data {
                depth: 1,
                file_offset: 200
            }
        )));
        assert!(!a.continued_by(&next(10, Held::Zero)));
        let z = next(0, Held::Zero);
        assert!(z.continued_by(&next(5, Held::Zero)));
        assert!(!z.continued_by(&next(6, Held::Zero)));
    }
}
