//! Command-line interface (clap derive). Thin: every command calls one
//! library function and prints its result.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use chainfs::chain::{Chain, ChainOptions};
use chainfs::error::{Error, IoContext, Result};
use chainfs::format::LayerOptions;
use chainfs::image::FlatImage;
use chainfs::size::parse_size;

mod helper;
mod manual;

#[derive(Parser)]
#[command(
    name = "chainfs",
    version,
    about = "Mount, flatten, check and merge chains of differencing virtual disks (VHD, VHDX, qcow2, raw)",
    long_about = "chainfs reads a chain of differencing disks (a leaf, its parent, ... down to a base) \
as one flat disk image.\n\nParents are found from the locators stored in each child, verified by \
their unique id, and opened read-only. Set RUST_LOG=debug for a trace of what is opened and why.\n\n\
Exit status: 0 success; 1 I/O error; 2 usage error; 3 corrupt image or `check` found problems; \
4 file or parent not found; 5 broken chain (id mismatch, loop, depth, size); 6 unsupported; \
7 in use; 8 access denied; 9 invalid argument; 10 invalid state (read-only, \
dependent disks, a merge to finish)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// How parents are found; shared by every command that opens a chain.
#[derive(Args, Clone, Default)]
struct ChainArgs {
    /// Also look for parents (by file name) in DIR; repeatable.
    #[arg(long = "parent-dir", value_name = "DIR")]
    parent_dirs: Vec<PathBuf>,
    /// Use PATH as the parent of CHILD, whatever CHILD's locators say; repeatable.
    #[arg(long = "parent", value_name = "CHILD=PATH", value_parser = parse_override)]
    overrides: Vec<(PathBuf, PathBuf)>,
    /// Accept a parent whose unique id differs from the one the child records.
    #[arg(long)]
    ignore_id_mismatch: bool,
    /// Read images whose footer or header checksum is wrong (read-only).
    #[arg(long = "ignore-checksum")]
    ignore_checksums: bool,
    /// Metadata cache budget (e.g. 64M).
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    cache: Option<u64>,
}

impl ChainArgs {
    fn options(&self, writable: bool) -> ChainOptions {
        ChainOptions {
            writable,
            parent_dirs: self.parent_dirs.clone(),
            overrides: self.overrides.clone(),
            ignore_id_mismatch: self.ignore_id_mismatch,
            ignore_checksums: self.ignore_checksums,
            cache_bytes: self.cache.unwrap_or(0) as usize,
            force: false,
            force_hint: "--force",
        }
    }
}

fn parse_override(s: &str) -> std::result::Result<(PathBuf, PathBuf), String> {
    let (c, p) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected CHILD=PATH"))?;
    Ok((PathBuf::from(c), PathBuf::from(p)))
}

fn parse_size_arg(s: &str) -> std::result::Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

#[derive(Clone, Copy, ValueEnum)]
enum CreateType {
    Dynamic,
    Fixed,
}

/// `chainfs merge`'s own arguments.
#[derive(Args)]
struct MergeArgs {
    /// The layer to merge down (usually the leaf).
    source: PathBuf,
    /// The parent or ancestor to merge into (not needed with --status).
    #[arg(required_unless_present = "status")]
    destination: Option<PathBuf>,
    /// Keep SOURCE and the layers between, detached, instead of deleting them.
    #[arg(long)]
    keep: bool,
    /// Return only once the file system has freed the deleted layers' space.
    ///
    /// By default the command returns as soon as the merged chain is
    /// final and durable and the merged layers are unlinked; a small
    /// background process (`chainfs-free`) then holds them while the
    /// file system frees their blocks (a few tenths of a second per GiB
    /// on ext4 mounted with `discard`). Until it exits, `df` does not
    /// count that space and the file system cannot be unmounted
    /// (EBUSY): use this option in scripts that unmount it or need the
    /// space right after.
    #[arg(long, conflicts_with = "keep")]
    wait_free: bool,
    /// Merge even though other differencing disks depend on a changed layer.
    #[arg(long)]
    force: bool,
    /// Show whether a merge out of SOURCE was interrupted, and change nothing.
    #[arg(long)]
    status: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a base disk (--size) or a differencing child (--parent).
    ///
    /// The format follows the extension: .vhd/.avhd make a VHD, .vhdx/.avhdx
    /// a VHDX, .qcow2 a qcow2 (version 3), .raw/.img a raw file. A VHD or
    /// VHDX child must have the format of its parent; a qcow2 child may sit
    /// on a qcow2 or raw parent.
    Create {
        /// The new image (never overwritten).
        image: PathBuf,
        /// Virtual size of a base disk: 512, 4K, 2M, 10G, 1T.
        #[arg(long, value_parser = parse_size_arg, required_unless_present = "parent")]
        size: Option<u64>,
        /// Base disk type.
        #[arg(
            long = "type",
            value_enum,
            default_value = "dynamic",
            conflicts_with = "parent"
        )]
        kind: CreateType,
        /// Block size (default: VHD 2M, a VHD child its parent's; VHDX 32M
        /// dynamic, 2M fixed or differencing, as Hyper-V makes them); the
        /// cluster size of a qcow2 (512 to 2M, default 64K).
        #[arg(long, visible_alias = "cluster-size", value_parser = parse_size_arg)]
        block_size: Option<u64>,
        /// Logical sector size of a VHDX base: 512 or 4096 (a child takes
        /// its parent's).
        #[arg(long, default_value_t = 512, conflicts_with = "parent")]
        logical_sector: u32,
        /// Make a differencing disk on top of this parent.
        #[arg(long, conflicts_with = "size")]
        parent: Option<PathBuf>,
        /// The format version to write: qcow2 1.1 (version 3, the default)
        /// or 0.10 (version 2).
        #[arg(long)]
        compat: Option<String>,
        /// qcow2: extended L2 entries (32 sub-clusters per cluster; needs
        /// clusters of at least 16K and version 3).
        #[arg(long)]
        extended_l2: bool,
    },
    /// Show the whole chain, leaf first.
    Info {
        /// The leaf (or any layer) of the chain.
        image: PathBuf,
        #[command(flatten)]
        chain: ChainArgs,
        /// Print JSON: an array of layers, leaf first; for a broken chain an
        /// object {"layers":[...], "error":{"message":..., "exit_code":N}}.
        #[arg(long)]
        json: bool,
    },
    /// Check checksums, tables, locators, identities and sizes of the chain.
    ///
    /// Exit status 0 when clean, 3 with one line per problem otherwise.
    Check {
        /// The leaf (or any layer) of the chain to check.
        image: PathBuf,
        #[command(flatten)]
        chain: ChainArgs,
        /// Print JSON: {"image":..., "clean":..., "problems":[...]}; when the
        /// check cannot run, also "error": {"message":..., "exit_code":N}.
        #[arg(long)]
        json: bool,
    },
    /// Write the flattened image to a file (raw, VHD, VHDX, qcow2), a block device or a pipe.
    ///
    /// A regular OUTPUT is written in the format its name ends in: .vhd:
    /// VHD; .vhdx: VHDX; .qcow2: qcow2; .raw, .img, .dd, any other name:
    /// raw (every format `create` makes; --format NAME overrides the name). An image is a new
    /// standalone disk (no parent) of the chain's virtual size, dynamic
    /// (--type fixed, --block-size as for `create`): only data is written,
    /// never blocks of zeros.
    ///
    /// OUTPUT may be a new file (sparse where the image reads zeros; written
    /// under a temporary name and linked into place), an existing regular
    /// file (--force; replaced the same way), a block device (--force;
    /// written in place, never truncated or replaced: it must hold the
    /// virtual size, zero runs are zeroed with BLKZEROOUT, bytes past the
    /// virtual size are left alone), a FIFO or `-` for standard output
    /// (streamed in order, zeros included), or /dev/null; these last three
    /// and block devices take raw only. A symlink is followed (a dangling
    /// one creates its target if that folder exists). Other character
    /// devices, folders and sockets are refused. Nothing but a regular file
    /// is ever replaced; a failed export removes the file it was writing.
    Export {
        /// The leaf of the chain to flatten.
        image: PathBuf,
        /// A file (its extension names the format), a block device, a FIFO,
        /// `-` (standard output) or /dev/null.
        output: PathBuf,
        #[command(flatten)]
        chain: ChainArgs,
        /// Write this format whatever OUTPUT's name ends in (raw, vhd,
        /// vhdx, ...: the names `info` shows).
        #[arg(long, value_name = "NAME")]
        format: Option<String>,
        /// Type of an image OUTPUT (not raw).
        #[arg(long = "type", value_enum)]
        kind: Option<CreateType>,
        /// Block size of an image OUTPUT (not raw; default as for `create`).
        #[arg(long, value_parser = parse_size_arg)]
        block_size: Option<u64>,
        /// Replace an existing regular file, or overwrite a block device.
        #[arg(long)]
        force: bool,
        /// Worker threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Print the byte counts and the format as JSON when done (on
        /// stderr when the image goes to standard output).
        #[arg(long)]
        json: bool,
    },
    /// Show the chain as one flat file, MOUNTPOINT/disk.raw, over FUSE.
    ///
    /// Runs in the background once the mount is live (-f: stay in the
    /// foreground). MOUNTPOINT also holds `chain` (the layers), `control`
    /// (merge commands) and `jobs/`. Unmount with `chainfs umount`,
    /// `fusermount3 -u` or `umount`; SIGINT/SIGTERM to the daemon do the same.
    /// Logs go to stderr with -f (RUST_LOG=info|debug).
    ///
    /// Also a mount helper: `mount -t fuse.chainfs IMAGE MOUNTPOINT -o
    /// OPTIONS` and /etc/fstab lines of type fuse.chainfs run `chainfs IMAGE
    /// MOUNTPOINT -o OPTIONS` (through mount.fuse3), and the binary installed
    /// as mount.fuse.chainfs takes the same form. The generic mount(8)
    /// options are accepted: dev/nodev, suid/nosuid, exec/noexec,
    /// atime/noatime go to the kernel (default nodev,nosuid), user/users
    /// imply noexec,nosuid,nodev; defaults, auto, noauto, nofail, _netdev,
    /// x-* and comment= are for mount(8) and systemd and ignored.
    Mount {
        /// The leaf of the chain to mount.
        image: PathBuf,
        /// An empty folder; the chain appears as MOUNTPOINT/disk.raw.
        mountpoint: PathBuf,
        /// Mount options, comma separated: ro (default), rw (writes land in
        /// the leaf; fsync and close make them durable; refused when other
        /// disks have the leaf as their parent), force (with rw: mount a
        /// parent writable anyway, which corrupts its children),
        /// copy_on_read (with rw: data read from parents is stored in the
        /// leaf), allow_other (other users may use the mount, as far as the
        /// modes allow: the files take the leaf's owner and group and only
        /// the access every layer file grants), allow_root, uid=N and gid=N
        /// (numeric owner and group of the files; access is still narrowed
        /// for them), umask=OOO (octal; modes become 0444/0555, 0666 for
        /// control and a rw disk.raw, minus OOO, instead of the layers'
        /// narrowing), cache=SIZE (metadata cache, default 64M),
        /// readahead=SIZE (memory for reading ahead of sequential readers of
        /// disk.raw, default 32M; 0: the page cache's read-ahead), threads=N
        /// (request threads, default 4), log=FILE (where a background daemon
        /// writes its log).
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Stay in the foreground.
        #[arg(short = 'f', long)]
        foreground: bool,
        #[command(flatten)]
        chain: ChainArgs,
    },
    /// Merge SOURCE (and the layers below it) into DESTINATION, an ancestor.
    ///
    /// Like Hyper-V's MergeVirtualHardDisk: afterwards DESTINATION holds what
    /// SOURCE showed, the children of SOURCE point at DESTINATION, and SOURCE
    /// and the layers between are deleted (--keep: kept, detached). Refused
    /// when other disks depend on a layer it changes (--force overrides).
    /// An interrupted merge is finished by running the same command again.
    Merge {
        #[command(flatten)]
        args: MergeArgs,
        #[command(flatten)]
        chain: ChainArgs,
    },
    /// Unmount a chainfs mount and wait until its chain is released.
    Umount {
        /// Where the chain is mounted.
        mountpoint: PathBuf,
    },
    /// Give IMAGE's unused space back to the file system (Optimize-VHD).
    ///
    /// Offline: refused while a mount, merge or write uses IMAGE (exit 7).
    /// Blocks that hold only zeros (in a differencing disk: nothing of their
    /// own) are unallocated, space no table references (left by an
    /// interrupted write or merge) is punched out, and the file is cut after
    /// its last block. What the disk reads and its identity do not change;
    /// a crash at any point leaves it readable with the same content.
    /// Dynamic and differencing VHD and VHDX; only IMAGE, not its parents.
    Compact {
        /// The image file to compact (only this file changes).
        image: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Record PARENT as CHILD's parent (repair a chain whose parent moved).
    ///
    /// Like Hyper-V's Set-VHD -ParentPath and qemu-img rebase -u: PARENT
    /// must be the disk CHILD records (same unique id; VHDX: DataWriteGuid),
    /// else it is refused naming both ids. Every locator and parent name in
    /// CHILD is rewritten for PARENT's location, crash-safely. Refused while
    /// CHILD is mounted or being merged (in use, exit 7).
    SetParent {
        /// The differencing disk whose parent moved.
        child: PathBuf,
        /// The parent's new location (must be the disk CHILD records).
        parent: PathBuf,
        /// Make PARENT the parent although its id differs, and record its id.
        #[arg(long)]
        ignore_id_mismatch: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write bytes into the leaf of a chain (parents are never changed).
    ///
    /// Zero runs of the input that the chain already reads as zeros are not
    /// stored (--no-sparse stores them). Refused when IMAGE is the parent of
    /// other disks (in its folder or a --parent-dir): writing into a parent
    /// corrupts its children (--force writes anyway).
    Write {
        /// The leaf to write into.
        image: PathBuf,
        /// Byte offset in the virtual disk.
        #[arg(long, value_parser = parse_size_arg)]
        offset: u64,
        /// Read the bytes from FILE (default: standard input).
        #[arg(long)]
        input: Option<PathBuf>,
        /// Write even though other differencing disks have IMAGE as their
        /// parent: they then show changed data (VHD) or no longer open
        /// (VHDX, whose DataWriteGuid changes).
        #[arg(long)]
        force: bool,
        /// Store zero runs too (allocating their blocks), like `dd`.
        #[arg(long)]
        no_sparse: bool,
        #[command(flatten)]
        chain: ChainArgs,
    },
    /// Print a shell completion script on standard output.
    ///
    /// bash: save as /usr/share/bash-completion/completions/chainfs (or
    /// ~/.local/share/bash-completion/completions/chainfs); zsh: as _chainfs
    /// in a folder on $fpath; fish: as
    /// ~/.config/fish/completions/chainfs.fish. scripts/install.sh does this.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (chainfs.1, chainfs-COMMAND.1) into DIR.
    ///
    /// Generated from this command-line definition, so they match --help.
    /// scripts/install.sh installs them under PREFIX/share/man/man1.
    Manpages {
        /// The folder to write them into (created if missing).
        dir: PathBuf,
    },
    /// Show which layer holds each run of the virtual disk (like `qemu-img map`).
    ///
    /// One line per run: offset, length, depth of the layer holding it (0 =
    /// IMAGE), where in that layer's file, and the file; runs no layer
    /// stores say `zero`. With --svg, draws the chain instead: one row per
    /// layer showing where it stores data, under a row coloured by the
    /// layer each part of the disk is read from.
    Map {
        /// The leaf of the chain to map.
        image: PathBuf,
        /// Print the runs as a JSON array.
        #[arg(long, conflicts_with = "svg")]
        json: bool,
        /// Write an SVG picture of the chain to FILE instead.
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
        /// Columns of the picture (the virtual disk is cut into this many bins).
        #[arg(long, default_value_t = 1000, requires = "svg")]
        bins: usize,
        #[command(flatten)]
        chain: ChainArgs,
    },
}

/// The clap definition of the whole command line, built in one place for
/// parsing, man pages and completions.
pub fn command() -> clap::Command {
    Cli::command()
}

pub fn run() -> Result<i32> {
    let sub_names: Vec<String> = command()
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .chain(["help".to_string()])
        .collect();
    let names: Vec<&str> = sub_names.iter().map(String::as_str).collect();
    let args = match helper::rewrite(std::env::args_os().collect(), &names) {
        Ok(helper::Argv::Clap(args)) => args,
        Ok(helper::Argv::Fake) => return Ok(0),
        Err(msg) => return Err(Error::invalid(msg)),
    };
    let cli = Cli::parse_from(args);
    match cli.cmd {
        Cmd::Create {
            image,
            size,
            kind,
            block_size,
            logical_sector,
            parent,
            compat,
            extended_l2,
        } => {
            chainfs::format::create(
                &image,
                &chainfs::format::CreateOptions {
                    size,
                    fixed: matches!(kind, CreateType::Fixed),
                    block_size,
                    logical_sector,
                    parent,
                    version: compat,
                    subblocks: extended_l2,
                },
            )?;
            Ok(0)
        }
        Cmd::Info { image, chain, json } => {
            // A broken chain still shows the layers that open; the error
            // that stopped the walk follows (stderr, and in the JSON) and
            // sets the exit code, as when nothing is shown.
            let (r, err) = match chainfs::info::report_partial(&image, &chain.options(false)) {
                Ok(r) => r,
                Err(e) => (Vec::new(), Some(e)),
            };
            match (&err, json) {
                (None, true) => println!(
                    "{}",
                    serde_json::to_string_pretty(&r).expect("serialisable")
                ),
                (Some(e), true) => {
                    // Complete chains keep the plain array scripts know;
                    // a broken one is an object, so no script takes it
                    // for a whole chain.
                    let v = serde_json::json!({
                        "layers": r,
                        "error": { "message": e.to_string(), "exit_code": e.exit_code() },
                    });
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&v).expect("serialisable")
                    );
                }
                (_, false) => print!("{}", chainfs::info::render(&r)),
            }
            match err {
                Some(e) => Err(e),
                None => Ok(0),
            }
        }
        Cmd::Check { image, chain, json } => {
            let found = match chainfs::check::check_chain(&image, &chain.options(false)) {
                Ok(p) => p,
                // Scripts that asked for JSON get JSON on failure too; the
                // message also goes to stderr and the exit code is the error's.
                Err(e) if json => {
                    let v = serde_json::json!({
                        "image": image,
                        "clean": false,
                        "problems": [],
                        "notes": [],
                        "error": { "message": e.to_string(), "exit_code": e.exit_code() },
                    });
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&v).expect("serialisable")
                    );
                    eprintln!("chainfs: {e}");
                    return Ok(e.exit_code());
                }
                Err(e) => return Err(e),
            };
            let (problems, notes) = (found.problems, found.notes);
            if json {
                let v = serde_json::json!({
                    "image": image,
                    "clean": problems.is_empty(),
                    "problems": problems,
                    "notes": notes,
                });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).expect("serialisable")
                );
            } else {
                for n in &notes {
                    println!("note: {n}");
                }
                if problems.is_empty() {
                    println!("{}: clean", image.display());
                }
                for p in &problems {
                    println!("{p}");
                }
            }
            Ok(if problems.is_empty() { 0 } else { 3 })
        }
        Cmd::Export {
            image,
            output,
            chain,
            format,
            kind,
            block_size,
            force,
            threads,
            json,
        } => {
            let c = Chain::open(&image, &chain.options(false))?;
            let flat = FlatImage::new(&c);
            let opts = chainfs::export::ExportOptions {
                overwrite: force,
                threads,
                format,
                fixed: matches!(kind, Some(CreateType::Fixed)),
                block_size,
            };
            let bar = progress_bar(flat.size());
            let stats = chainfs::export::export(&flat, &output, &opts, &|done| {
                if let Some(b) = &bar {
                    b.set_position(done);
                }
            })?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            if json {
                let j = serde_json::to_string(&stats).expect("serialisable");
                if stats.target == "stdout" {
                    eprintln!("{j}");
                } else {
                    println!("{j}");
                }
            }
            Ok(0)
        }
        Cmd::Mount {
            image,
            mountpoint,
            options,
            foreground,
            chain,
        } => {
            let mo = chainfs::mount::MountOptions::parse(&options)?;
            chainfs::mount::mount(
                &image,
                &mountpoint,
                &mo,
                &chain.options(mo.writable),
                foreground,
            )?;
            Ok(0)
        }
        Cmd::Merge { args, chain } => merge(args, &chain),
        Cmd::Compact { image, json } => {
            let r = chainfs::compact::compact(&image)?;
            if json {
                println!("{}", serde_json::to_string(&r).expect("serialisable"));
            } else {
                use chainfs::size::human;
                println!(
                    "{}: {} freed ({} blocks unallocated, {} ranges punched out); {} on disk, file size {} -> {}",
                    image.display(),
                    human(r.bytes_freed),
                    r.stats.blocks_freed,
                    r.stats.holes_punched,
                    human(r.bytes_on_disk_after),
                    r.stats.file_size_before,
                    r.stats.file_size_after
                );
            }
            Ok(0)
        }
        Cmd::Umount { mountpoint } => {
            chainfs::mount::umount(&mountpoint)?;
            Ok(0)
        }
        Cmd::SetParent {
            child,
            parent,
            ignore_id_mismatch,
            json,
        } => {
            let r = chainfs::relink::set_parent(&child, &parent, ignore_id_mismatch)?;
            if json {
                println!("{}", serde_json::to_string(&r).expect("serialisable"));
            } else {
                match r.parent_id {
                    Some(id) => println!(
                        "{}: parent is now {} ({id})",
                        child.display(),
                        parent.display()
                    ),
                    None => println!(
                        "{}: parent is now {} (by name)",
                        child.display(),
                        parent.display()
                    ),
                }
            }
            Ok(0)
        }
        Cmd::Write {
            image,
            offset,
            input,
            force,
            no_sparse,
            chain,
        } => {
            let (mut reader, len, what): (Box<dyn Read>, Option<u64>, String) = match &input {
                Some(p) => {
                    let f = std::fs::File::open(p).ctx(p, "cannot open", None)?;
                    let md = f.metadata().ctx(p, "cannot stat", None)?;
                    let len = md.is_file().then_some(md.len());
                    (Box::new(f), len, p.display().to_string())
                }
                None => (Box::new(std::io::stdin().lock()), None, "<stdin>".into()),
            };
            let opts = ChainOptions {
                force,
                ..chain.options(true)
            };
            let c = Chain::open(&image, &opts)?;
            let flat = FlatImage::new(&c);
            let stats =
                chainfs::write::write_stream(&flat, offset, &mut reader, len, !no_sparse, &what)?;
            flat.flush()?;
            log::info!(
                "{}: {} bytes in, {} written, {} zero bytes skipped",
                image.display(),
                stats.bytes_in,
                stats.bytes_written,
                stats.bytes_skipped
            );
            Ok(0)
        }
        Cmd::Completions { shell } => {
            manual::completions(command(), shell);
            Ok(0)
        }
        Cmd::Manpages { dir } => {
            for p in manual::write_manpages(command(), &dir)? {
                println!("{}", p.display());
            }
            Ok(0)
        }
        Cmd::Map {
            image,
            json,
            svg,
            bins,
            chain,
        } => {
            let c = Chain::open(&image, &chain.options(false))?;
            let flat = FlatImage::new(&c);
            let layers = flat.layers();
            if let Some(path) = svg {
                let f = std::fs::File::create(&path).ctx(&path, "cannot create", None)?;
                let mut w = std::io::BufWriter::new(f);
                chainfs::map::write_svg(&layers, flat.size(), bins, &mut w)?;
                std::io::Write::flush(&mut w).ctx(&path, "cannot write", None)?;
                return Ok(0);
            }
            let stdout = std::io::stdout();
            let mut w = std::io::BufWriter::new(stdout.lock());
            if json {
                chainfs::map::write_json(&layers, flat.size(), &mut w)?;
            } else {
                chainfs::map::write_text(&layers, flat.size(), &mut w)?;
            }
            std::io::Write::flush(&mut w).map_err(|e| {
                Error::new(chainfs::ErrorKind::Io, format!("cannot write the map: {e}"))
            })?;
            Ok(0)
        }
    }
}

fn merge(args: MergeArgs, chain: &ChainArgs) -> Result<i32> {
    use chainfs::intent;
    use chainfs::merge::{FreeSpace, MergeRequest, Progress};
    let MergeArgs {
        source,
        destination,
        keep,
        wait_free,
        force,
        status,
        json,
    } = args;
    let record = intent::read(&source)?;
    if status {
        let text = record.as_ref().map(|r| r.to_string());
        if json {
            let v = serde_json::json!({ "source": source, "interrupted": record });
            println!(
                "{}",
                serde_json::to_string_pretty(&v).expect("serialisable")
            );
        } else {
            println!(
                "{}",
                text.unwrap_or_else(|| format!("{}: no interrupted merge", source.display()))
            );
        }
        return Ok(if record.is_some() { 3 } else { 0 });
    }
    let destination = destination.expect("clap requires DESTINATION");
    let report = |bytes: u64, finished_only: bool| {
        if json {
            let v = serde_json::json!({
                "ReturnValue": chainfs::error::RC_COMPLETED,
                "source": source,
                "destination": destination,
                "bytes_copied": bytes,
                "finished_interrupted_merge": finished_only,
            });
            println!("{}", serde_json::to_string(&v).expect("serialisable"));
        }
    };
    if let Some(r) = record.filter(|r| r.phase == intent::Phase::Relinked) {
        if chainfs::paths::canonical(&r.destination) != chainfs::paths::canonical(&destination) {
            return Err(Error::invalid(format!(
                "{r}; it merged into another destination"
            )));
        }
        chainfs::merge::finish(
            &r,
            &LayerOptions {
                writable: true,
                ignore_checksums: false,
                cache: chainfs::cache::MetaCache::new(1 << 20),
            },
        )?;
        report(0, true);
        return Ok(0);
    }
    let c = Chain::open(&source, &chain.options(false))?;
    let flat = FlatImage::new(&c);
    drop(c);
    let req = MergeRequest {
        source: chainfs::paths::canonical(&source).display().to_string(),
        destination: destination.display().to_string(),
        keep,
        force,
        parent_dirs: chain.parent_dirs.clone(),
    };
    let mut plan = chainfs::merge::plan_with(flat.layers(), &req, None, &chain.overrides)
        .map_err(|e| swapped_hint(e, &source, &destination, chain))?;
    plan.free = if wait_free {
        FreeSpace::Wait
    } else {
        FreeSpace::InHelper
    };
    let progress = Progress::default();
    let bar = progress_bar(0);
    let result = std::thread::scope(|s| {
        let h = s.spawn(|| chainfs::merge::execute(&flat, plan, &progress));
        while bar.is_some() && !h.is_finished() {
            if let Some(b) = &bar {
                b.set_length(
                    progress
                        .bytes_total
                        .load(std::sync::atomic::Ordering::Relaxed),
                );
                b.set_position(
                    progress
                        .bytes_done
                        .load(std::sync::atomic::Ordering::Relaxed),
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        h.join().expect("merge thread panicked")
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    result?;
    report(
        progress
            .bytes_done
            .load(std::sync::atomic::Ordering::Relaxed),
        false,
    );
    Ok(0)
}

/// When DESTINATION is not in SOURCE's chain but SOURCE is in
/// DESTINATION's, the arguments were swapped: say so, with that chain.
fn swapped_hint(e: Error, source: &Path, destination: &Path, chain: &ChainArgs) -> Error {
    // A bare name is looked up in the chain; as a file it may be in the
    // working folder or next to SOURCE.
    let Some(dst) = [
        destination.to_path_buf(),
        chainfs::paths::folder_of(source).join(destination),
    ]
    .into_iter()
    .find(|p| p.is_file()) else {
        return e;
    };
    let Ok(dc) = Chain::open(&dst, &chain.options(false)) else {
        return e;
    };
    let src = chainfs::paths::canonical(source);
    if !dc
        .layers
        .iter()
        .any(|l| chainfs::paths::canonical(l.path()) == src)
    {
        return e;
    }
    Error::new(
        e.kind,
        format!(
            "{e}. {} is a descendant of {} ({}): did you swap them? \
             Merge the child into its ancestor: chainfs merge {} {}",
            dst.display(),
            source.display(),
            chainfs::merge::chain_order(&dc.layers),
            dst.display(),
            source.display()
        ),
    )
}

/// A progress bar on a terminal, nothing otherwise.
fn progress_bar(total: u64) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(total);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    Some(b)
}

#[cfg(test)]
mod tests {
    /// `--help` describes every positional argument of every command.
    #[test]
    fn every_positional_argument_has_help() {
        let mut cmd = super::command();
        cmd.build();
        let mut missing = Vec::new();
        for sub in cmd.get_subcommands() {
            for a in sub.get_positionals() {
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{} {}", sub.get_name(), a.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "positionals without help: {missing:?}");
        assert!(cmd.get_subcommands().any(|s| s.get_name() == "mount"));
    }

    #[test]
    fn clap_definition_is_consistent() {
        super::command().debug_assert();
    }
}
