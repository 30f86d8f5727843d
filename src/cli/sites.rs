//! `sites list` (admin kit): who has connected, when, what each contributed, and when its
//! certificate expires.

use std::path::PathBuf;

use alveolus_proto::client::AdminClient;
use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum SitesCommand {
    List {
        #[arg(long)]
        kit: PathBuf,
    },
}

fn format_time(unix_ms: i64) -> String {
    if unix_ms == 0 {
        return "never".into();
    }
    let ago = (alveolus_coordinator::clock::unix_ms() - unix_ms).max(0) / 1000;
    match ago {
        0..60 => format!("{ago} s ago"),
        60..3600 => format!("{} min ago", ago / 60),
        _ => format!("{} h ago", ago / 3600),
    }
}

pub async fn sites_command(command: SitesCommand) -> Result<()> {
    let SitesCommand::List { kit } = command;
    let sites = AdminClient::connect(&kit).await?.sites().await?;
    if sites.is_empty() {
        println!("no site has connected yet");
    }
    for site in sites {
        let contributed: Vec<String> = site
            .contributions
            .iter()
            .map(|(run, rounds)| format!("{run}: rounds {}", compact_rounds(rounds)))
            .collect();
        println!(
            "{:<20} last contact {:<12} {}",
            site.name,
            format_time(site.last_contact_unix_ms),
            if contributed.is_empty() {
                "no contributions yet".to_string()
            } else {
                contributed.join("; ")
            }
        );
        if let Some(expires) = site.certificate_expires_unix {
            let (class, text) =
                alveolus_dashboard::view::validity(expires, alveolus_coordinator::clock::unix_ms());
            let flag = match class {
                "error" => "  ! renew it: the site cannot connect",
                "warn" => "  ! renew it soon",
                _ => "",
            };
            println!("{:<20} certificate {text}{flag}", "");
        }
    }
    Ok(())
}

/// `1,2,3,5` -> `1-3,5`.
fn compact_rounds(rounds: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < rounds.len() {
        let mut j = i;
        while j + 1 < rounds.len() && rounds[j + 1] == rounds[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            rounds[i].to_string()
        } else {
            format!("{}-{}", rounds[i], rounds[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    #[test]
    fn rounds_are_compacted() {
        assert_eq!(super::compact_rounds(&[1, 2, 3, 5, 7, 8]), "1-3,5,7-8");
        assert_eq!(super::compact_rounds(&[]), "");
    }
}
