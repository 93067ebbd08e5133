//! The WDF DMA scenario over the vfio-user client back end, against the real device
//! server binary (started by the test): this process is the VMM.

mod wdf_support;

use std::sync::Arc;

use domdma_driver_model::backend::phys::PhysConfig;
use domdma_driver_model::backend::vfio_user::{DeviceServer, VfioUserBackend, VfioUserConfig};
use domdma_driver_model::dma::SharedBackend;

#[test]
fn dma_copy_through_domain_common_buffers_vfio_user() {
    let server = DeviceServer::spawn(&[]).unwrap_or_else(|e| panic!("{e}"));
    let phys = PhysConfig {
        huge_pages_per_node: 8,
        ..PhysConfig::default()
    };
    let backend: SharedBackend = Arc::new(
        VfioUserBackend::connect(&VfioUserConfig::new(server.socket()).with_phys(phys))
            .unwrap_or_else(|e| panic!("connecting: {e}\n--- server log ---\n{}", server.log())),
    );
    wdf_support::dma_copy_through_domain_common_buffers(backend);
}
