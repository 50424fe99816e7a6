//! `behest-stream`: look into a store directory from the shell.
//!
//! ```text
//! cargo run --features cli --bin behest-stream -- inspect ./data
//! cargo run --features cli --bin behest-stream -- replay ./data --run RUN_ID [--after SEQ] [--json]
//! cargo run --features cli --bin behest-stream -- verify ./data
//! ```
//!
//! Each command opens the store, so it fails with `Locked` while a hub has
//! the directory open. `verify` exits with status 1 when it finds damage,
//! 2 when it cannot run at all.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use behest_stream::codec::{self, FORMAT_VERSION, STORE_FORMAT_VERSION};
use behest_stream::{Config, RunId, Store, StoreError};
use clap::{Parser, Subcommand};

/// Runs listed per store read.
const PAGE: usize = 256;

#[derive(Debug, Parser)]
#[command(
    name = "behest-stream",
    version,
    about = "Inspect, replay and verify a behest-stream store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The store's epoch and format version, its runs and events, and its
    /// size on disk.
    Inspect {
        /// The store directory.
        dir: PathBuf,
    },
    /// A run's events in seq order, one per line.
    Replay {
        /// The store directory.
        dir: PathBuf,
        /// The run.
        #[arg(long)]
        run: String,
        /// Start after this seq.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Each envelope as JSON (the wire form) instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Decode every record and check that every run's seqs are gapless;
    /// report damage and exit non-zero if there is any.
    Verify {
        /// The store directory.
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("behest-stream: cannot start a runtime: {error}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async {
        match run(cli.command).await {
            Ok(code) => code,
            Err(message) => {
                eprintln!("behest-stream: {message}");
                ExitCode::from(2)
            }
        }
    })
}

async fn run(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Inspect { dir } => {
            let store = open(&dir).await?;
            let outcome = inspect(&store, &dir).await;
            close(&store).await?;
            outcome.map(|()| ExitCode::SUCCESS)
        }
        Command::Replay {
            dir,
            run,
            after,
            json,
        } => {
            let run_id = uuid::Uuid::parse_str(&run)
                .map(RunId::from_uuid)
                .map_err(|e| format!("--run {run:?} is not a run id: {e}"))?;
            let store = open(&dir).await?;
            let outcome = replay(&store, run_id, after, json).await;
            close(&store).await?;
            outcome.map(|()| ExitCode::SUCCESS)
        }
        Command::Verify { dir } => {
            let store = open(&dir).await?;
            let outcome = verify(&store).await;
            close(&store).await?;
            outcome
        }
    }
}

/// Opens an existing store; a missing directory is an error, not a new
/// store.
async fn open(dir: &Path) -> Result<Store, String> {
    if !dir.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    Store::open(Config::new(dir))
        .await
        .map_err(|e| e.to_string())
}

async fn close(store: &Store) -> Result<(), String> {
    store.close().await.map_err(|e| e.to_string())
}

/// Every run of the store, page by page, each with what the store knows of
/// it (or the error reading it).
async fn for_each_run(
    store: &Store,
    mut visit: impl FnMut(behest_stream::RunInfo),
) -> Result<(), StoreError> {
    let mut after = None;
    loop {
        let page = store.runs_after(after, PAGE).await?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = Some(last.run_id);
        page.into_iter().for_each(&mut visit);
    }
}

async fn inspect(store: &Store, dir: &Path) -> Result<(), String> {
    println!("store      {}", dir.display());
    println!("epoch      {}", store.epoch());
    println!("format     store version {STORE_FORMAT_VERSION}, values version {FORMAT_VERSION}");
    let (mut runs, mut ended, mut removed, mut events) = (0u64, 0u64, 0u64, 0u64);
    for_each_run(store, |info| {
        runs += 1;
        ended += u64::from(info.is_ended());
        if info.is_removed() {
            removed += 1;
        } else {
            // Seqs come from disk: a damaged store must not overflow the sum.
            events = events.saturating_add(info.last_seq);
        }
    })
    .await
    .map_err(|e| e.to_string())?;
    println!(
        "runs       {runs} ({ended} ended, of which {removed} removed by retention; {} live)",
        runs - ended
    );
    println!("events     {events}");
    println!("on disk    {} bytes", dir_size(dir));
    Ok(())
}

async fn replay(store: &Store, run_id: RunId, after: u64, json: bool) -> Result<(), String> {
    if store
        .run_info(run_id)
        .await
        .map_err(|e| e.to_string())?
        .is_none()
    {
        return Err(format!("the store has no run {run_id}"));
    }
    let mut after = after;
    loop {
        // Damage ends the replay, but what precedes it is still served.
        let (page, damage) = match store.list_after(run_id, after, PAGE).await {
            Ok(page) => (page, None),
            Err(error @ StoreError::Corrupt { seq, .. }) if seq > after.saturating_add(1) => {
                let intact = usize::try_from(seq - after - 1).map_or(PAGE, |n| n.min(PAGE));
                let page = store
                    .list_after(run_id, after, intact)
                    .await
                    .map_err(|e| e.to_string())?;
                (page, Some(error))
            }
            Err(error) => return Err(error.to_string()),
        };
        print_page(&page, json)?;
        if let Some(damage) = damage {
            return Err(damage.to_string());
        }
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = last.seq;
    }
}

/// One envelope per line: JSON (the wire form), or seq, time and kind.
fn print_page(page: &[behest_stream::RuntimeEventEnvelope], json: bool) -> Result<(), String> {
    for envelope in page {
        if json {
            let line = codec::envelope_to_json(envelope).map_err(|e| e.to_string())?;
            println!("{line}");
        } else {
            println!(
                "{:>6}  {}  {}",
                envelope.seq,
                envelope.emitted_at.to_rfc3339(),
                envelope.event.kind()
            );
        }
    }
    Ok(())
}

/// Reads every run whole. Damage in one run is reported and the others are
/// still read; the exit status says whether there was any.
async fn verify(store: &Store) -> Result<ExitCode, String> {
    let mut runs = Vec::new();
    let listed = for_each_run(store, |info| runs.push(info.run_id)).await;
    let (mut damaged, mut events, mut removed) = (0u64, 0u64, 0u64);
    if let Err(error) = listed {
        // A run whose record is damaged stops the listing; say so.
        damaged += 1;
        println!("damaged  listing runs: {error}");
    }
    for run_id in &runs {
        match store.verify_run(*run_id).await {
            Ok(check) => {
                events += check.events;
                removed += u64::from(check.removed_at.is_some());
            }
            Err(error) => {
                damaged += 1;
                println!("damaged  run {run_id}: {error}");
            }
        }
    }
    println!(
        "verified {} runs ({removed} removed by retention), {events} events: {}",
        runs.len(),
        if damaged == 0 {
            "every record decodes and every run is gapless".to_owned()
        } else {
            format!("{damaged} damaged")
        }
    );
    Ok(if damaged == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Bytes of the files below `dir`.
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_size(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}
