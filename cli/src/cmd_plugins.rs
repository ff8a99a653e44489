//! `lookout plugins list|verify|pin`, and where plugins are looked for.

use anyhow::{anyhow, Result};
use clap::{Args, Subcommand};
use lookout_core::error::Chain;
use lookout_core::plugin::{self, guard};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Clone)]
pub struct PluginDirArg {
    /// Plugins folder [default: ./plugins if it holds any .so, else the folder of the lookout executable]
    #[arg(long)]
    pub plugins: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum PluginsCommand {
    /// Load every plugin and show its manifest (or why it is refused)
    List(PluginDirArg),
    /// Check every plugin without running a pass; exits non-zero if any is refused
    Verify(PluginDirArg),
    /// Write the pin file (SHA-256 of every plugin that loads); from then on only pinned,
    /// unchanged plugins are loaded. Exits non-zero if a library was left out
    Pin(PluginDirArg),
}

/// The plugins folder: the flag, else `./plugins` when it holds a library, else the
/// directory of the running executable.
pub fn resolve_dir(arg: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p.clone());
    }
    let local = PathBuf::from("plugins");
    if guard::discover(&local).is_ok_and(|f| !f.is_empty()) {
        return Ok(local);
    }
    let exe = std::env::current_exe().map_err(|e| anyhow!("cannot locate the lookout executable: {e}"))?;
    exe.parent().map(Path::to_path_buf).ok_or_else(|| anyhow!("the lookout executable has no folder; pass --plugins"))
}

/// Where `list`, `verify` and `pin` keep the private copies a library is loaded from: the
/// data directory when there is one, else a temporary folder removed afterwards (looking
/// at plugins does not create a data directory). That folder is made beside where the
/// data directory would be, as the copies are loaded from there as they would be from
/// the data directory (the system's temporary folder may forbid running code from it);
/// there only when that place cannot be written.
fn copies_home(data: &Path) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    if data.exists() {
        return Ok((data.to_path_buf(), None));
    }
    let beside = match data.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".lookout-plugins-");
    let tmp = builder
        .tempdir_in(&beside)
        .or_else(|_| builder.tempdir())
        .map_err(|e| anyhow!("cannot create a temporary folder for the plugins' copies: {e}"))?;
    Ok((tmp.path().to_path_buf(), Some(tmp)))
}

pub fn run(data: &Path, cmd: PluginsCommand) -> Result<ExitCode> {
    match cmd {
        PluginsCommand::List(a) => {
            let dir = resolve_dir(&a.plugins)?;
            let (home, _tmp) = copies_home(data)?;
            let loaded = plugin::load_dir(&dir, &home)?;
            println!("plugins in {}:", dir.display());
            for p in &loaded.plugins {
                let m = &p.manifest;
                println!("  {} {} ({}) — {}", m.name, m.version, p.file.display(), m.title);
                println!("    severity {}, ATT&CK {}, inputs {}", m.severity, m.mitre.join(","), m.inputs.join(","));
                println!("    sha256 {}", p.sha256);
                for param in &m.parameters {
                    println!("    --set {}.{}={}  ({})", m.name, param.name, param.default, param.description);
                }
            }
            for r in &loaded.refused {
                println!("  REFUSED {}: {}", r.path.display(), Chain(&r.reason));
            }
            Ok(ExitCode::SUCCESS)
        }
        PluginsCommand::Verify(a) => {
            let dir = resolve_dir(&a.plugins)?;
            let (home, _tmp) = copies_home(data)?;
            let loaded = plugin::load_dir(&dir, &home)?;
            for p in &loaded.plugins {
                println!(
                    "ok       {} ({} {}, sha256 {})",
                    p.file.display(),
                    p.manifest.name,
                    p.manifest.version,
                    p.sha256
                );
            }
            for r in &loaded.refused {
                println!("REFUSED  {}: {}", r.path.display(), Chain(&r.reason));
            }
            Ok(if loaded.refused.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        PluginsCommand::Pin(a) => {
            let dir = resolve_dir(&a.plugins)?;
            guard::check_dir(&dir)?;
            let (home, _tmp) = copies_home(data)?;
            let cache = guard::cache_dir(&home)?;
            let mut pins = guard::Pins::default();
            let mut skipped = 0usize;
            // Pin what verifies and loads now, ignoring any previous pin file.
            for file in guard::discover(&dir)? {
                match plugin::load_one(&file, &cache, None) {
                    Ok(p) => {
                        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                        println!("pinned   {name} {} ({} {})", p.sha256, p.manifest.name, p.manifest.version);
                        pins.0.insert(name, p.sha256.clone());
                    }
                    Err(e) => {
                        skipped += 1;
                        println!("skipped  {}: {}", file.display(), Chain(&e));
                    }
                }
            }
            let path = guard::write_pins(&dir, &pins)?;
            println!("wrote {}", path.display());
            // A library left out of the pin file is refused from now on: a script that
            // pins after an upgrade must not take that for success.
            if skipped > 0 {
                eprintln!(
                    "lookout: {skipped} library(ies) not pinned (above) and refused from now on; fix them and run \
                     `lookout plugins pin` again"
                );
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
