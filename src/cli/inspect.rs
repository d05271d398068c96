//! `spirekeep inspect`

use clap::Args;

use super::output::print_json;
use super::{DatastoreArgs, exit};
use crate::datastore::{self, OpenMode};

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub datastore: DatastoreArgs,
}

pub(crate) async fn run(args: &InspectArgs, json: bool) -> anyhow::Result<u8> {
    let resolved = args.datastore.resolve()?;
    let ds = datastore::open(&resolved.spec, OpenMode::ReadOnly).await?;
    let report = crate::inspect::inspect(ds.as_ref()).await;
    let warnings = match (&report, &resolved.server) {
        (Ok(_), Some(layout)) => crate::inspect::key_store_warnings(ds.as_ref(), layout).await,
        _ => Ok(Vec::new()),
    };
    ds.close().await;
    let mut report = report?;
    report.warnings = warnings?;
    if json {
        print_json(&report)?;
    } else {
        print!("{}", report.render_human());
    }
    Ok(exit::OK)
}
