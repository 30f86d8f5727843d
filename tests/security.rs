//! Who may talk to the coordinator, and what each identity may do. Real certificates from
//! `provision`, a real coordinator on a loopback port.

mod common;

use std::path::Path;

use alveolus_coordinator::provision::revoke;
use alveolus_proto::PROTOCOL_VERSION;
use alveolus_proto::identity::Role;
use alveolus_proto::pb::{self, admin_client::AdminClient, federation_client::FederationClient};
use common::*;
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// Joins with the given trust anchor and client identity; any refusal becomes an error string.
async fn try_join(
    port: u16,
    ca_pem: &[u8],
    identity: Option<(&Path, &Path)>,
) -> Result<pb::JoinResponse, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("127.0.0.1");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(read(cert), read(key)));
    }
    let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    FederationClient::new(channel)
        .join(pb::JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "test".into(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[tokio::test(flavor = "multi_thread")]
async fn only_valid_unrevoked_project_certificates_get_in() {
    let project = project(&["alpha", "beta"]);
    let _coordinator = start_coordinator(&project).await;
    let ca = read(&project.root.join("ca/ca.pem"));
    let kit = |site: &str| project.site_kit(site);

    // A site with its own kit gets in, and its name comes from its certificate.
    let alpha = kit("alpha");
    let joined = try_join(
        project.port,
        &ca,
        Some((&alpha.join("cert.pem"), &alpha.join("key.pem"))),
    )
    .await;
    let joined = joined.expect("a valid site certificate is accepted");
    assert_eq!(joined.site, "alpha");
    assert_eq!(joined.project, "lungs");

    // No client certificate.
    assert!(try_join(project.port, &ca, None).await.is_err());

    // A certificate from another project's CA, even one that names a known site.
    let foreign = project_on(project.port, "lungs", &["alpha"]);
    let forged = foreign.site_kit("alpha");
    let refused = try_join(
        project.port,
        &ca,
        Some((&forged.join("cert.pem"), &forged.join("key.pem"))),
    )
    .await;
    assert!(
        refused.is_err(),
        "a foreign CA's certificate was accepted: {refused:?}"
    );

    // A revoked site: accepted before, refused after `revoke`.
    let beta = kit("beta");
    let beta_id = (beta.join("cert.pem"), beta.join("key.pem"));
    assert!(
        try_join(project.port, &ca, Some((&beta_id.0, &beta_id.1)))
            .await
            .is_ok()
    );
    revoke(&project.root, Role::Site, "beta").unwrap();
    let refused = try_join(project.port, &ca, Some((&beta_id.0, &beta_id.1))).await;
    assert!(
        refused.is_err(),
        "a revoked certificate was accepted: {refused:?}"
    );
    // Others are unaffected.
    assert!(
        try_join(
            project.port,
            &ca,
            Some((&alpha.join("cert.pem"), &alpha.join("key.pem")))
        )
        .await
        .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_are_enforced_on_every_call() {
    let project = project(&["alpha"]);
    let _coordinator = start_coordinator(&project).await;

    // A site certificate calling the Admin service.
    let site_channel = connect(&project.site_kit("alpha")).await;
    let status = AdminClient::new(site_channel.clone())
        .list_runs(pb::ListRunsRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = AdminClient::new(site_channel)
        .abort_run(pb::GetRunRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // An admin certificate pushing an update or asking for tasks.
    let admin_channel = connect(&project.admin_kit()).await;
    let header = pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(pb::UpdateHeader {
            run_id: "run-1".into(),
            round: 1,
            base_version: "0".repeat(64),
            num_samples: 1,
            metrics: Some(pb::Metrics {
                loss: 1.0,
                dice: 0.0,
            }),
            total_bytes: 0,
            masked: false,
            train_seconds: 0.0,
        })),
    };
    let status = FederationClient::new(admin_channel.clone())
        .push_update(futures::stream::iter(vec![header]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = FederationClient::new(admin_channel)
        .next_task(pb::NextTaskRequest { wait_seconds: 0 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_speaking_another_protocol_version_is_told_both_versions() {
    let project = project(&["alpha"]);
    let _coordinator = start_coordinator(&project).await;
    let status = FederationClient::new(connect(&project.site_kit("alpha")).await)
        .join(pb::JoinRequest {
            protocol_version: PROTOCOL_VERSION + 1,
            agent_version: "future".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status
            .message()
            .contains(&format!("version {}", PROTOCOL_VERSION + 1)),
        "{}",
        status.message()
    );
    assert!(
        status
            .message()
            .contains(&format!("version {PROTOCOL_VERSION}")),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_site_revoked_while_connected_is_refused_at_its_next_call() {
    let project = project(&["alpha"]);
    let _coordinator = start_coordinator(&project).await;
    let mut admin = admin(&project).await;
    let model = tiny_model(3);
    start_run(&mut admin, run_config(1, 1, 600), &model).await;
    let mut site = FederationClient::new(connect(&project.site_kit("alpha")).await);
    let task = join_and_take_task(&mut site, "test", 5).await;

    // The connection stays open; the certificate is revoked under it.
    revoke(&project.root, Role::Site, "alpha").unwrap();
    let refused = push_update(&mut site, &task, &constant_update(&model, 0.01), 4)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("revoked"), "{refused:?}");
    let refused = site
        .next_task(pb::NextTaskRequest { wait_seconds: 0 })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn only_provisioned_names_get_in_and_a_site_added_later_does() {
    use alveolus_coordinator::config::Roster;
    use alveolus_coordinator::roster::add_identity;

    let project = project(&["alpha"]);
    let _coordinator = start_coordinator(&project).await;

    // A hospital joins later: a kit of its own, no one else's re-issued, taken at once.
    let kit = add_identity(&project.root, Role::Site, "gamma", 30).unwrap();
    assert_eq!(kit, project.site_kit("gamma"));
    let mut gamma = FederationClient::new(connect(&kit).await);
    let joined = gamma
        .join(pb::JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(joined.site, "gamma");
    assert!(
        add_identity(&project.root, Role::Site, "gamma", 30).is_err(),
        "added twice"
    );

    // Out of the roster, a certificate of the project CA is no longer enough.
    let roster_path = project.coordinator_kit().join("roster.toml");
    let mut roster = Roster::read(&roster_path).unwrap().unwrap();
    assert!(roster.sites.remove("gamma"));
    std::fs::write(&roster_path, roster.to_toml()).unwrap();
    let refused = gamma
        .next_task(pb::NextTaskRequest { wait_seconds: 0 })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("never provisioned"),
        "{refused:?}"
    );
    // Others are unaffected.
    let mut alpha = FederationClient::new(connect(&project.site_kit("alpha")).await);
    join_and_take_task_or_wait(&mut alpha).await;
}

/// Joins and asks for a task (there is no run: the answer is to wait).
async fn join_and_take_task_or_wait(site: &mut FederationClient<tonic::transport::Channel>) {
    site.join(pb::JoinRequest {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "test".into(),
    })
    .await
    .unwrap();
    site.next_task(pb::NextTaskRequest { wait_seconds: 0 })
        .await
        .unwrap();
}
