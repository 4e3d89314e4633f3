//! `shoal up`: a whole local Shoal from one command, with embedded defaults and no external
//! services. Today that is one origin; the tracker and agents join it as they land.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::OriginConfig;
use crate::origin::Origin;

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Where the local cluster keeps its data
    #[arg(long, env = "SHOAL_DATA_DIR", default_value = "shoal-data")]
    pub data_dir: PathBuf,
    /// Registry address of the origin
    #[arg(long, env = "SHOAL_LISTEN", default_value = "127.0.0.1:5000")]
    pub listen: SocketAddr,
}

pub async fn run(
    args: UpArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = OriginConfig {
        listen: args.listen,
        data_dir: args.data_dir.join("origin"),
        ..OriginConfig::default()
    };
    let origin = Origin::bind(config).await?;
    let addr = origin.local_addr()?;
    println!(
        "Shoal is up.\n\
         \x20 origin (push and pull):  http://{addr}/v2/   metrics: http://{addr}/metrics\n\
         \x20 data:                    {}\n\n\
         Try it:\n\
         \x20 docker tag busybox {addr}/demo/busybox:1 && docker push {addr}/demo/busybox:1\n\
         \x20 docker pull {addr}/demo/busybox:1\n\
         \x20 skopeo copy --dest-tls-verify=false oci:./layout:tag docker://{addr}/demo/app:1\n\
         Press Ctrl-C to stop.",
        args.data_dir.display()
    );
    origin.serve(shutdown).await
}
