//! The screen drawn on ratatui's test backend from known models, and the keys' effects.

use std::time::Duration;

use ratatui::{
    Terminal,
    backend::TestBackend,
    buffer::Buffer,
    crossterm::event::{KeyCode, KeyEvent, KeyModifiers},
    style::Color,
};

use super::{
    input::{Effect, handle_key},
    model::{Actions, Data, InspectBody, Model, Sort, View},
    render::render,
};
use crate::api::proto;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const NOW: f64 = 1_700_000_000.0;

/// A workload of `pid` named `name`, at `level` with an optional ETA.
fn workload(pid: u32, name: &str, level: &str, eta_seconds: Option<f64>) -> proto::Workload {
    proto::Workload {
        pid,
        comm: name.to_owned(),
        executable: name.to_owned(),
        risk: Some(proto::Assessment {
            level: level.to_owned(),
            eta_seconds,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// llama-server (pid 1717): critical, 42 s to OOM, half its 4 GiB of weights resident, KV
/// 512 MiB of 1 GiB, 5 GiB on GPU 0 by the ioctls (NVML says more) and 1 GiB on GPU 1 by
/// NVML alone. ollama (pid 4242): ok, its 8 GiB all resident, the larger footprint, no GPU.
fn data() -> Data {
    let llama = proto::Workload {
        runtime: "llama-cpp".into(),
        model: "/models/qwen-7b.gguf".into(),
        weights_bytes: 4 * GIB,
        weights_resident_bytes: 2 * GIB,
        kv_bytes_now: Some(512 * MIB),
        kv_bytes_max: Some(GIB),
        anon_bytes: 600 * MIB,
        rss_bytes: 2 * GIB + 600 * MIB,
        gpu: vec![
            proto::ProcessGpu {
                device: 0,
                vram_bytes_ioctl: Some(5 * GIB),
                vram_bytes_nvml: Some(5 * GIB + 300 * MIB),
                ..Default::default()
            },
            proto::ProcessGpu {
                device: 1,
                vram_bytes_nvml: Some(GIB),
                ..Default::default()
            },
        ],
        ..workload(1717, "llama-server", "critical", Some(42.0))
    };
    let ollama = proto::Workload {
        runtime: "ollama".into(),
        model: "/srv/llama3-8b.gguf".into(),
        weights_bytes: 8 * GIB,
        weights_resident_bytes: 8 * GIB,
        anon_bytes: 300 * MIB,
        rss_bytes: 8 * GIB + 300 * MIB,
        ..workload(4242, "ollama", "ok", None)
    };
    Data {
        mode: "daemon".into(),
        refreshed_unix: NOW,
        workloads: vec![ollama, llama],
        host: Some(proto::HostStatus {
            limit_bytes: 16 * GIB,
            used_bytes: 12 * GIB,
            risk: Some(proto::Assessment {
                level: "elevated".into(),
                eta_seconds: Some(120.0),
                ..Default::default()
            }),
            ..Default::default()
        }),
        oom_kills: vec![proto::OomKill {
            ts_unix: NOW - 30.0,
            pid: 999,
            comm: "python3".into(),
            memcg: "/ml".into(),
            ..Default::default()
        }],
        actions: Actions::InForce(vec![proto::ActionEntry {
            description: "memory.low of /srv/llama: 4 GiB".into(),
            time: NOW - 65.0,
            ..Default::default()
        }]),
        error: None,
    }
}

fn model() -> Model {
    Model::new(data(), Duration::from_secs(1))
}

/// The model drawn on a 160x40 test terminal.
fn draw(model: &Model) -> Buffer {
    let mut terminal = Terminal::new(TestBackend::new(160, 40)).expect("a test terminal");
    terminal
        .draw(|frame| render(frame, model))
        .expect("draw on the test backend");
    terminal.backend().buffer().clone()
}

/// The buffer's rows as text.
fn lines(buffer: &Buffer) -> Vec<String> {
    let area = buffer.area;
    (0..area.height)
        .map(|y| (0..area.width).map(|x| buffer[(x, y)].symbol()).collect())
        .collect()
}

/// The first row holding `needle`, and the column it starts at (in cells).
fn find(buffer: &Buffer, needle: &str) -> Option<(u16, u16)> {
    lines(buffer).iter().enumerate().find_map(|(y, line)| {
        let byte = line.find(needle)?;
        Some((y as u16, line[..byte].chars().count() as u16))
    })
}

fn row_of(buffer: &Buffer, needle: &str) -> String {
    let (y, _) = find(buffer, needle).unwrap_or_else(|| {
        panic!(
            "{needle:?} is not on the screen:\n{}",
            lines(buffer).join("\n")
        )
    });
    lines(buffer)[usize::from(y)].clone()
}

fn press(model: &mut Model, code: KeyCode) -> Effect {
    handle_key(model, KeyEvent::new(code, KeyModifiers::NONE))
}

fn order(model: &Model) -> Vec<u32> {
    model.rows().iter().map(|w| w.pid).collect()
}

#[test]
fn the_table_shows_each_workload_with_its_bars_level_and_eta() {
    let screen = draw(&model());
    let llama = row_of(&screen, "llama-server");
    for expected in [
        "1717",
        "llama-cpp",
        "qwen-7b.gguf",
        "████░░░░ 2.00 GiB/4.00 GiB",
        "████░░░░ 512 MiB/1.00 GiB",
        "▎░░░░░░░ 600 MiB",
        "critical",
        "42s",
    ] {
        assert!(llama.contains(expected), "{expected:?} not in {llama:?}");
    }
    let ollama = row_of(&screen, "ollama ");
    for expected in [
        "4242",
        "████████ 8.00 GiB/8.00 GiB",
        "▏░░░░░░░ 300 MiB",
        "ok",
    ] {
        assert!(ollama.contains(expected), "{expected:?} not in {ollama:?}");
    }
    assert!(!ollama.contains("critical"), "{ollama}");
    let (header, gpu) = find(&screen, "GPU ").expect("the GPU column");
    let cell = |row: &str| -> String { row.chars().skip(usize::from(gpu)).take(10).collect() };
    assert_eq!(cell(&llama), "6.00 GiB  ", "5 GiB ioctl + 1 GiB NVML");
    assert_eq!(cell(&ollama), "-         ", "no GPU memory");
    assert!(header < find(&screen, "llama-server").unwrap().0);
    let (y, x) = find(&screen, "critical").expect("the critical level");
    assert_eq!(screen[(x, y)].fg, Color::Red, "critical is red");
    let (y, x) = find(&screen, " ok ").expect("the ok level");
    assert_eq!(screen[(x + 1, y)].fg, Color::Green, "ok is green");
}

#[test]
fn a_gpu_figure_that_misses_early_allocations_is_a_lower_bound() {
    let mut model = model();
    let llama = model
        .data
        .workloads
        .iter_mut()
        .find(|w| w.pid == 1717)
        .unwrap();
    llama.gpu[0].ioctl_partial = true;
    let screen = draw(&model);
    let llama = row_of(&screen, "llama-server");
    assert!(llama.contains(" ≥6.00 GiB "), "{llama}");
}

#[test]
fn the_header_and_events_show_the_host_the_agent_and_what_happened() {
    let screen = draw(&model());
    let host = row_of(&screen, "host");
    for expected in [
        "12.0 GiB of 16.0 GiB (75%)",
        "██████░░",
        "elevated",
        "ETA 2m00s",
    ] {
        assert!(host.contains(expected), "{expected:?} not in {host:?}");
    }
    let agent = row_of(&screen, "agent daemon");
    assert!(agent.contains("22:13:20 UTC every 1s"), "{agent}");
    assert!(agent.contains("sort: risk"), "{agent}");
    for expected in [
        "OOM kills (1)",
        "30s ago  pid 999 python3  /ml",
        "actions in force (1)",
        "1m05s ago  memory.low of /srv/llama: 4 GiB",
    ] {
        row_of(&screen, expected);
    }
}

#[test]
fn hidden_actions_standalone_mode_and_errors_are_said() {
    let mut model = model();
    model.data.mode = "standalone".into();
    model.data.actions = Actions::NotVisible;
    model.refresh(Err("the agent on /run/x.sock stopped".into()));
    let screen = draw(&model);
    row_of(&screen, "agent standalone");
    row_of(&screen, "actions: not visible to this user");
    row_of(&screen, "error: the agent on /run/x.sock stopped");
    // The failed refresh kept the workloads.
    row_of(&screen, "llama-server");
}

#[test]
fn names_from_processes_cannot_drive_the_terminal() {
    let mut model = model();
    model.data.workloads[0].executable = "evil\x1b[2J".into();
    let screen = draw(&model);
    row_of(&screen, "evil\\x1b[2J");
}

#[test]
fn keys_cycle_and_reverse_the_sort() {
    let mut model = model();
    assert_eq!(order(&model), [1717, 4242], "risk: critical first");
    let screen = draw(&model);
    assert!(find(&screen, "llama-server") < find(&screen, "ollama "));

    assert_eq!(press(&mut model, KeyCode::Char('s')), Effect::None);
    assert_eq!(model.sort, Sort::Memory);
    assert_eq!(
        order(&model),
        [4242, 1717],
        "memory: the larger footprint first"
    );
    let screen = draw(&model);
    assert!(find(&screen, "ollama ") < find(&screen, "llama-server"));
    row_of(&screen, "sort: memory");

    press(&mut model, KeyCode::Char('s'));
    assert_eq!((model.sort, order(&model)), (Sort::Pid, vec![1717, 4242]));
    press(&mut model, KeyCode::Char('r'));
    assert_eq!(order(&model), [4242, 1717], "pid reversed");
    row_of(&draw(&model), "sort: pid, reversed");
    press(&mut model, KeyCode::Char('s'));
    assert_eq!((model.sort, order(&model)), (Sort::Name, vec![4242, 1717]));
    press(&mut model, KeyCode::Char('r'));
    assert_eq!(order(&model), [1717, 4242], "llama-server before ollama");
    press(&mut model, KeyCode::Char('s'));
    assert_eq!(model.sort, Sort::Risk);
}

#[test]
fn the_selection_follows_its_process_and_stays_in_the_table() {
    let mut model = model();
    assert_eq!(model.selected, Some(1717), "the first row");
    press(&mut model, KeyCode::Char('s'));
    assert_eq!(
        model.selected_index(),
        Some(1),
        "1717 moved down with the sort"
    );
    press(&mut model, KeyCode::Down);
    assert_eq!(model.selected, Some(1717), "no row below the last");
    press(&mut model, KeyCode::Char('k'));
    assert_eq!(model.selected, Some(4242));
    press(&mut model, KeyCode::Up);
    assert_eq!(model.selected, Some(4242), "no row above the first");
    press(&mut model, KeyCode::Char('j'));
    assert_eq!(model.selected, Some(1717));
    let mut gone = data();
    gone.workloads.retain(|w| w.pid != 1717);
    model.refresh(Ok(gone));
    assert_eq!(
        model.selected,
        Some(4242),
        "the first row once 1717 is gone"
    );
}

#[test]
fn enter_opens_the_inspect_view_of_the_selected_row_and_esc_goes_back() {
    let mut model = model();
    press(&mut model, KeyCode::Down);
    assert_eq!(press(&mut model, KeyCode::Enter), Effect::Inspect(4242));
    let View::Inspect(inspect) = &model.view else {
        panic!("Enter left the table view: {:?}", model.view);
    };
    assert_eq!(
        (inspect.pid, inspect.body.clone()),
        (4242, InspectBody::Sampling)
    );
    let screen = draw(&model);
    row_of(&screen, "inspect pid 4242 (ollama)");
    row_of(&screen, "sampling pid 4242");
    assert!(
        find(&screen, "llama-server").is_none(),
        "the table is hidden"
    );

    let report: Vec<String> = (0..60).map(|i| format!("report line {i:02}")).collect();
    model.show_inspect(4242, InspectBody::Report(report));
    row_of(&draw(&model), "report line 00");
    press(&mut model, KeyCode::Down);
    press(&mut model, KeyCode::PageDown);
    let screen = draw(&model);
    row_of(&screen, "report line 11");
    assert!(
        find(&screen, "report line 10").is_none(),
        "scrolled by 11 lines"
    );
    press(&mut model, KeyCode::End);
    row_of(&draw(&model), "report line 59");

    assert_eq!(press(&mut model, KeyCode::Esc), Effect::None);
    assert_eq!(model.view, View::Table);
    row_of(&draw(&model), "llama-server");
    assert_eq!(press(&mut model, KeyCode::Esc), Effect::Quit);
}

#[test]
fn q_quits_everywhere_and_a_late_report_of_a_closed_pane_is_dropped() {
    let mut model = model();
    assert_eq!(press(&mut model, KeyCode::Char('q')), Effect::Quit);
    assert_eq!(press(&mut model, KeyCode::Enter), Effect::Inspect(1717));
    press(&mut model, KeyCode::Esc);
    model.show_inspect(1717, InspectBody::Failed("late".into()));
    assert_eq!(model.view, View::Table);
    press(&mut model, KeyCode::Enter);
    assert_eq!(press(&mut model, KeyCode::Char('q')), Effect::Quit);
    let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
    assert_eq!(handle_key(&mut model, ctrl_c), Effect::Quit);
}

#[test]
fn enter_without_workloads_does_nothing() {
    let mut model = Model::new(Data::default(), Duration::from_secs(1));
    assert_eq!(press(&mut model, KeyCode::Enter), Effect::None);
    press(&mut model, KeyCode::Down);
    assert_eq!(model.view, View::Table);
    row_of(&draw(&model), "AI workloads: none tracked");
}

#[test]
fn bars_fill_to_an_eighth_of_a_cell() {
    use super::render::bar_text;
    assert_eq!(bar_text(0, 0), "░░░░░░░░");
    assert_eq!(bar_text(5, 0), "░░░░░░░░", "no whole, no fill");
    assert_eq!(bar_text(1, 64), "▏░░░░░░░");
    assert_eq!(bar_text(1, 2), "████░░░░");
    assert_eq!(bar_text(63, 64), "███████▉");
    assert_eq!(bar_text(9, 8), "████████", "clamped to full");
}
