//! Sites with real data formats in a real run: a DICOM series with a DICOM SEG, a NIfTI pair,
//! PNG slices and a DICOM series carrying patient identifiers, whose every byte to the
//! coordinator is recorded (in plaintext, by a proxy holding the project's certificates) and
//! searched for those identifiers.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alveolus_imaging::dicom_write::{SeriesTags, write_series};
use alveolus_imaging::{nifti, synth};
use alveolus_proto::domain::{RunConfig, RunState};
use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

fn readers(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/readers")
        .join(path)
}

/// Identifiers that must never leave the site, as they are written in the files.
const PATIENT_NAME: &str = "KOWALSKA^JADWIGA";
const PATIENT_ID: &str = "PID-99887766";
const BIRTH_DATE: &str = "19230417";
const ACCESSION: &str = "ACC-55443322";
const INSTITUTION: &str = "Szpital Zdrojowy Testowy";
const NAMES: &str = "Kowalska";

fn identifiable_site(dir: &Path) -> (PathBuf, SeriesTags) {
    let case = synth::chest_ct(11, [48, 48, 10], [7.0, 7.0, 12.0]);
    let mut tags = SeriesTags::synthetic(11);
    tags.patient_name = PATIENT_NAME.into();
    tags.patient_id = PATIENT_ID.into();
    tags.patient_birth_date = BIRTH_DATE.into();
    tags.accession_number = ACCESSION.into();
    tags.institution_name = INSTITUTION.into();
    tags.referring_physician_name = "DR^KOWALSKI".into();
    let root = dir.join(format!("scans-{NAMES}"));
    write_series(
        &root.join("ct"),
        &case.image,
        &tags,
        &format!("{NAMES}-slice"),
    )
    .unwrap();
    nifti::write(&root.join(format!("{NAMES}-labels.nii.gz")), &case.labels).unwrap();
    // A second scan of the same patient as a validation case: the run measures each round's
    // model on it, and only figures may leave.
    let validation = synth::chest_ct(12, [48, 48, 10], [7.0, 7.0, 12.0]);
    let mut validation_tags = SeriesTags::synthetic(12);
    validation_tags.patient_name = PATIENT_NAME.into();
    validation_tags.patient_id = PATIENT_ID.into();
    validation_tags.accession_number = ACCESSION.into();
    write_series(
        &root.join("ct-followup"),
        &validation.image,
        &validation_tags,
        &format!("{NAMES}-followup"),
    )
    .unwrap();
    nifti::write(
        &root.join(format!("{NAMES}-followup-labels.nii.gz")),
        &validation.labels,
    )
    .unwrap();
    std::fs::write(
        root.join("dataset.toml"),
        format!(
            "[[case]]\nid = \"{NAMES}-{PATIENT_ID}\"\nimage = \"ct\"\nlabels = \"{NAMES}-labels.nii.gz\"\n\n\
             [[case]]\nid = \"{NAMES}-followup-{PATIENT_ID}\"\nimage = \"ct-followup\"\nlabels = \"{NAMES}-followup-labels.nii.gz\"\nsplit = \"validation\"\n"
        ),
    )
    .unwrap();
    (root, tags)
}

fn description(dir: &Path, name: &str, text: String) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn sites_train_from_every_format_and_send_no_identifiers() {
    let coordinator_port = free_port();
    let proxy_port = free_port();
    let project = project_on(coordinator_port, "lungs", &["dicom", "seg", "nifti", "png"]);
    let data = project.path("site-data");
    std::fs::create_dir_all(&data).unwrap();
    let (dicom_site, tags) = identifiable_site(&data);
    // The GE series' only segment is the liver; here it stands for "lung" to have a label.
    let seg_site = description(
        &data,
        "seg.toml",
        format!(
            "[labels]\nlung = [1]\n\n[[case]]\nid = \"liver\"\nimage = {:?}\nlabels = {:?}\n",
            readers("dicom/ct3slice_liverseg"),
            readers("dicom/ct3slice_liverseg/liver_seg.dcm")
        ),
    );
    let nifti_site = description(
        &data,
        "nifti.toml",
        format!(
            "[labels]\nlung = [10, 11, 12, 13, 14]\nunlisted = \"background\"\n\n[[case]]\nid = \"ts\"\nimage = {:?}\nlabels = {:?}\n",
            readers("nifti/totalseg_example_ct_sm.nii.gz"),
            readers("nifti/totalseg_example_seg.nii.gz")
        ),
    );
    let png_site = site_data(&project, "png", 0, 3);

    // The identifiable site dials the proxy, which dials the coordinator.
    let kit_file = project.site_kit("dicom").join("kit.toml");
    let kit = std::fs::read_to_string(&kit_file).unwrap().replace(
        &format!("127.0.0.1:{coordinator_port}"),
        &format!("127.0.0.1:{proxy_port}"),
    );
    std::fs::write(&kit_file, kit).unwrap();
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let proxy = tokio::spawn(recording_proxy(
        tokio::net::TcpListener::bind(("127.0.0.1", proxy_port))
            .await
            .unwrap(),
        SocketAddr::from(([127, 0, 0, 1], coordinator_port)),
        project.coordinator_kit(),
        project.site_kit("dicom"),
        recorded.clone(),
    ));

    let _coordinator = start_coordinator(&project).await;
    let _agents = [
        ("dicom", dicom_site.as_path()),
        ("seg", seg_site.as_path()),
        ("nifti", nifti_site.as_path()),
        ("png", png_site.as_path()),
    ]
    .map(|(site, data)| spawn_agent(&project, site, data));
    let mut admin = admin(&project).await;
    let config = RunConfig {
        validate_at_sites: true,
        ..run_config(1, 4, 300)
    };
    let run = start_run(&mut admin, config, &tiny_model(3)).await;
    let run = wait_for(&mut admin, &run.run_id, Duration::from_secs(300), |r| {
        r.state != RunState::Running
    })
    .await;
    let logs: String = ["dicom", "seg", "nifti", "png"]
        .iter()
        .map(|s| std::fs::read_to_string(project.path(&format!("{s}.log"))).unwrap_or_default())
        .collect();
    assert_eq!(run.state, RunState::Completed, "{logs}");

    // Every site trained on what its data holds.
    let samples = |site: &str| -> u64 {
        let record = project
            .path(&format!("audit-{site}"))
            .join(format!("{}-round0001.json", run.run_id));
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(record).unwrap()).unwrap();
        record["num_samples"].as_u64().unwrap()
    };
    assert_eq!(samples("seg"), 3);
    assert_eq!(samples("png"), 3);
    assert!(samples("nifti") > 0);
    assert!(samples("dicom") >= 5, "{}", samples("dicom"));
    // The final model was measured where the data are: figures and a case count came back.
    let validated: Vec<(String, u32)> = run.rounds[0]
        .validation
        .iter()
        .map(|v| (v.site.clone(), v.validation.cases))
        .collect();
    assert!(
        validated.contains(&("dicom".to_string(), 1)),
        "{validated:?}"
    );
    assert!(validated.contains(&("png".to_string(), 0)), "{validated:?}");

    // What the identifiable site sent, in plaintext: its updates and nothing of its files.
    proxy.abort();
    let sent = recorded.lock().unwrap().to_ascii_lowercase();
    let model_bytes = tiny_model(3).encode().len();
    assert!(
        sent.len() > model_bytes,
        "the proxy saw the update ({} bytes sent, the model is {model_bytes})",
        sent.len()
    );
    // Plaintext indeed: the update's tensor names are readable in the recording.
    let model = tiny_model(3);
    let tensor = model.tensors.keys().next().unwrap().to_ascii_lowercase();
    assert!(
        contains(&sent, tensor.as_bytes()),
        "no {tensor} in the recording"
    );
    let mut identifiers = vec![
        PATIENT_NAME.to_string(),
        PATIENT_ID.into(),
        BIRTH_DATE.into(),
        ACCESSION.into(),
        INSTITUTION.into(),
        NAMES.into(),
        tags.study_instance_uid.clone(),
        tags.series_instance_uid.clone(),
        "scans-".into(),
    ];
    identifiers.extend(PATIENT_NAME.split('^').map(String::from));
    let coordinator_files = files_under(&project.state());
    for identifier in &identifiers {
        let needle = identifier.to_ascii_lowercase().into_bytes();
        assert!(!contains(&sent, &needle), "{identifier} crossed the wire");
        for (path, bytes) in &coordinator_files {
            assert!(
                !contains(&bytes.to_ascii_lowercase(), &needle),
                "{identifier} is in the coordinator's {}",
                path.display()
            );
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

/// Terminates the agent's TLS with the coordinator's certificate, records what the agent
/// sends, and forwards it over a TLS connection of its own made with the site's certificate.
async fn recording_proxy(
    listener: tokio::net::TcpListener,
    upstream: SocketAddr,
    coordinator_kit: PathBuf,
    site_kit: PathBuf,
    recorded: Arc<Mutex<Vec<u8>>>,
) {
    let pem = |dir: &Path, name: &str| std::fs::read(dir.join(name)).unwrap();
    let chain = |bytes: Vec<u8>| {
        CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    };
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            chain(pem(&coordinator_kit, "cert.pem")),
            PrivateKeyDer::from_pem_slice(&pem(&coordinator_kit, "key.pem")).unwrap(),
        )
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut roots = rustls::RootCertStore::empty();
    for cert in chain(pem(&site_kit, "ca.pem")) {
        roots.add(cert).unwrap();
    }
    let mut client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            chain(pem(&site_kit, "cert.pem")),
            PrivateKeyDer::from_pem_slice(&pem(&site_kit, "key.pem")).unwrap(),
        )
        .unwrap();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    loop {
        let Ok((incoming, _)) = listener.accept().await else {
            return;
        };
        let (acceptor, connector, recorded) =
            (acceptor.clone(), connector.clone(), recorded.clone());
        tokio::spawn(async move {
            let Ok(agent) = acceptor.accept(incoming).await else {
                return;
            };
            let Ok(tcp) = tokio::net::TcpStream::connect(upstream).await else {
                return;
            };
            let name = ServerName::try_from("127.0.0.1").unwrap();
            let Ok(coordinator) = connector.connect(name, tcp).await else {
                return;
            };
            let (agent_read, agent_write) = tokio::io::split(agent);
            let (coordinator_read, coordinator_write) = tokio::io::split(coordinator);
            tokio::join!(
                pump(agent_read, coordinator_write, Some(recorded)),
                pump(coordinator_read, agent_write, None)
            );
        });
    }
}

async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    record: Option<Arc<Mutex<Vec<u8>>>>,
) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(record) = &record {
            record.lock().unwrap().extend_from_slice(&buffer[..n]);
        }
        if to.write_all(&buffer[..n]).await.is_err() || to.flush().await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
