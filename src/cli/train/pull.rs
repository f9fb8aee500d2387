//! `desam-train pull`: copy reviewed DICOM-SEGs and their MR series from Orthanc into a DICOM
//! training folder (resumable); the password comes from an environment variable, never the command line.

use std::path::PathBuf;

use crate::train::pull;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Orthanc's REST API, http://HOST:PORT or https://HOST:PORT. Only read (GET, POST /tools/lookup).
    #[arg(long)]
    pub orthanc: String,
    #[command(flatten)]
    pub login: super::OrthancLogin,
    /// Output folder: new, empty, or an earlier pull's (complete cases are skipped).
    #[arg(long)]
    pub out: PathBuf,
    /// User-metadata index of the review mark on SEG series (the plugin's ReviewMetadata).
    #[arg(long, default_value_t = 4302)]
    pub review_metadata: u16,
    /// The value that marks a SEG series as reviewed ground truth (set by a person).
    #[arg(long, default_value = "reviewed")]
    pub reviewed_value: String,
    /// DICOM attribute (keyword) of the MR series that names its site.
    #[arg(long, default_value = "InstitutionName", conflicts_with = "site")]
    pub site_tag: String,
    /// The same site for every pulled case instead of --site-tag.
    #[arg(long)]
    pub site: Option<String>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut o = pull::PullOptions::new(&a.orthanc, &a.out);
    o.connection = a.login.connection(a.orthanc)?;
    o.review_metadata = a.review_metadata;
    o.reviewed_value = a.reviewed_value;
    o.site = match a.site {
        Some(s) => pull::SiteFrom::Fixed(s),
        None => pull::SiteFrom::Tag(a.site_tag),
    };
    o.progress = true;
    let r = pull::pull(&o)?;
    println!(
        "pulled {} case(s), {} already up to date; {} has {} case(s) (manifest {})",
        r.pulled.len(),
        r.up_to_date.len(),
        a.out.display(),
        r.manifest.cases.len(),
        a.out.join(pull::MANIFEST).display()
    );
    Ok(())
}
